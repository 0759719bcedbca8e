"""Model cost: MACs against hand counts, size against byte counts, latency, peak memory."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from kdistill.compress import quantize_dynamic_linear
from kdistill.models import count_parameters, create_model
from kdistill.models.cost import (
    count_macs,
    count_weights,
    format_bytes,
    format_count,
    model_cost,
    peak_memory,
    serialized_size,
)
from kdistill.recipes.runner import RunRecord
from kdistill.report.table import build_rows, markdown_table


def test_linear_macs_by_hand():
    # y = W x + b with W 5×3: 15 multiply-adds per sample (the bias add is not counted)
    assert count_macs(nn.Linear(3, 5), torch.randn(1, 3)) == 15
    assert count_macs(nn.Linear(3, 5), torch.randn(4, 3)) == 4 * 15


@pytest.mark.parametrize(
    ("conv", "size", "expected"),
    [
        # 4 output channels × 6×6 positions (padding 1 keeps the size) × (2 inputs × 3×3 kernel)
        (nn.Conv2d(2, 4, 3, padding=1), 6, 4 * 6 * 6 * 2 * 3 * 3),
        # stride 2, no padding on 7×7: ⌊(7 − 3)/2⌋ + 1 = 3 → 3×3 positions
        (nn.Conv2d(3, 8, 3, stride=2, bias=False), 7, 8 * 3 * 3 * 3 * 3 * 3),
    ],
)
def test_conv_macs_by_hand(conv, size, expected):
    assert count_macs(conv, torch.randn(1, conv.in_channels, size, size)) == expected


def test_middle_student_macs_by_hand():
    # conv1 4×28×28 outputs × 1·9, conv2 8×14×14 × 4·9, fc 392 → 10
    expected = 4 * 28 * 28 * 9 + 8 * 14 * 14 * 36 + 392 * 10
    assert count_macs(create_model("middle_student"), torch.randn(1, 1, 28, 28)) == expected


def test_size_counts_every_tensor_byte_plus_a_small_header():
    float32 = serialized_size(nn.Linear(3, 5))  # 15 + 5 float32 = 80 bytes of data
    assert 8 + 80 < float32 <= 8 + 80 + 256  # 8-byte length prefix + JSON header
    float64 = serialized_size(nn.Linear(3, 5).double())  # 160 bytes of data
    assert 80 <= float64 - float32 <= 88  # the header may grow by its 8-byte padding


def test_int8_model_is_about_four_times_smaller_and_keeps_its_weight_count():
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    quantized = quantize_dynamic_linear(model)
    assert count_weights(quantized) == count_parameters(model)
    ratio = serialized_size(model) / serialized_size(quantized)
    assert 3.5 < ratio < 4.1  # int8 weights, float32 biases, per-tensor scales


class Sleeper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.threads_seen: list[int] = []

    def forward(self, x):
        self.threads_seen.append(torch.get_num_threads())
        time.sleep(0.004)
        return x


def test_latency_is_a_median_at_the_stated_thread_count_which_is_restored():
    model = Sleeper()
    cost = model_cost(model, (3,), threads=2, repeats=3, warmup=1, batch_sizes=(1, 8))
    assert set(model.threads_seen) == {2}
    assert torch.get_num_threads() == 1  # conftest's setting is back
    assert set(cost.latency_ms) == {1, 8}
    assert all(4.0 <= ms < 100 for ms in cost.latency_ms.values())
    # 2 batch sizes × (1 warm-up + 3 timed) + 1 peak-memory pass (+ the flop count)
    assert len(model.threads_seen) >= 9


class Allocates(nn.Module):
    """Three N-float temporaries, either all held at once or each freed before the next."""

    def __init__(self, hold: bool):
        super().__init__()
        self.hold = hold

    def forward(self, x):
        if self.hold:
            a, b, c = x * 2, x * 3, x * 4
            return (a + b + c)[0, 0]
        a = x * 2
        del a
        b = x * 3
        del b
        c = x * 4
        return c[0, 0]


def test_peak_memory_follows_what_is_alive_at_once():
    x = torch.randn(64, 1000)  # N = 256,000 bytes
    n = x.numel() * 4
    freed = peak_memory(Allocates(hold=False), x)
    held = peak_memory(Allocates(hold=True), x)
    assert n <= freed < n + 1024  # one temporary at a time (+ the returned element)
    # a, b, c alive, then a + b (alive while + c runs) and the result: 5 N at the peak
    assert 5 * n <= held < 5 * n + 1024


def test_peak_memory_includes_the_weights():
    model = nn.Linear(100, 100, bias=False)  # 40,000 bytes of weights
    x = torch.randn(1, 100)
    assert 40_000 + 400 <= peak_memory(model, x) < 40_000 + 400 + 1024


def test_cost_columns_in_the_results_table():
    cost = model_cost(create_model("mini_student"), (1, 28, 28), repeats=1, warmup=0).as_dict()
    records = [
        RunRecord("teacher", None, "teacher", 0, 1000, 0.90, cost=cost),
        RunRecord("s/alone/seed0", "s", "alone", 0, 10, 0.70, cost=cost),
        RunRecord("s/kd/seed0", "s", "kd", 0, 10, 0.80, {"temperature": 4.0}, cost=cost),
    ]
    table = markdown_table(build_rows(records))
    header = table.splitlines()[0]
    for column in ("params", "MACs", "size", "latency b1 (ms, median [IQR] of 1, 1 thr)",
                   "latency b64", "peak mem"):  # fmt: skip
        assert column in header
    assert f"| {format_count(cost['macs'])} | {format_bytes(cost['size_bytes'])} |" in table
    assert "+50 %" in table  # (80 − 70) / (90 − 70)


def test_formatting_helpers():
    assert format_count(6_508_298) == "6.51 M" and format_count(220) == "220"
    assert format_bytes(2048) == "2 KiB" and format_bytes(3 * 2**20) == "3 MiB"
