"""Teacher sources: where the teacher's outputs for a batch come from, behind one protocol
(`base.TeacherSource`: ``for_batch(batch) -> TeacherOutputs``, checked against the batch).

- `base`: the protocol, `TeacherOutputs`, `LiveTeacher` (the distiller runs it), `as_source`;
- `speedup` (+ `rewrite`): the live teacher sped up — folded, channels-last, bf16, compiled;
- `store`: outputs in memory and stored on disk (image outputs, top-k token distributions);
- `sequences`: generated sequences (sequence-level KD), substituted batch by batch.

A new kind of teacher is a new module here, never a branch in the engine. The package itself
imports nothing, so that any of its modules can be imported alone.
"""
