"""Issue 14 item 5: a parameter that would appear after the optimiser could have read the
parameter list (a connector made on the first forward, CRD's heads sized from the data) is an
error naming the term, its layers and the fix — never a parameter that silently never trains.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from kdistill import losses as L
from kdistill.data import ArrayDataset, BatchLoader
from kdistill.distill.distiller import Distiller, Term
from kdistill.engine import TrainConfig, fit
from kdistill.errors import LateParameterError


class ConvNet(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.fc = nn.Linear(width, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def mlp(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3))


def fitnet_distiller() -> Distiller:
    """Student width 4, teacher width 6 on layer `conv`: FitNet needs a 1×1 conv connector."""
    torch.manual_seed(0)
    return Distiller(ConvNet(6), ConvNet(4), [Term(L.FitNet(), student="conv", teacher="conv")])


def crd_distiller() -> Distiller:
    torch.manual_seed(0)
    crd = L.CRD(feature_dim=4, num_samples=16, num_negatives=8)  # heads sized from the data
    return Distiller(mlp(6), mlp(5), [Term(crd, student="1", teacher="1")])


X = torch.randn(4, 1, 5, 5)


@pytest.mark.parametrize(
    "read",
    [
        lambda d: torch.optim.Adam(d.trainable_parameters()),
        lambda d: torch.optim.SGD(d.parameters(), lr=0.1),
        lambda d: dict(d.named_parameters()),
    ],
    ids=["trainable_parameters", "parameters", "named_parameters"],
)
def test_connector_made_after_the_parameters_were_read_is_an_error(read):
    distiller = fitnet_distiller()
    read(distiller)
    message = (
        r"term 'fitnet' \(student layer 'conv' → teacher layer 'conv'\) needs a connector from "
        r"the student's \(4, 4, 5, 5\) to the teacher's \(4, 6, 5, 5\) \(parameters \(6, 4, 1, 1\)"
        r".*distiller\.build\(example_inputs\) before creating the optimiser"
    )
    with pytest.raises(LateParameterError, match=message):
        distiller(X)
    assert len(distiller.connectors) == 0  # nothing half-made is left behind


def test_crd_heads_made_after_the_parameters_were_read_is_an_error():
    distiller = crd_distiller()
    torch.optim.Adam(distiller.trainable_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CRD's own "heads built on first call" warning
        with pytest.raises(
            LateParameterError,
            match=r"term 'crd'.*\(student layer '1' → "
            r"teacher layer '1'\).*CRD created parameters.*distiller\.build",
        ):
            distiller(torch.randn(4, 4), index=torch.tensor([0, 1, 2, 3]))


def test_first_forward_before_the_optimiser_still_works_and_trains_the_connector():
    """The README's flow: `distiller(x)` once, then the optimiser; the connector trains."""
    distiller = fitnet_distiller()
    distiller(X)
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.5)
    weight = distiller.connectors["fitnet"][0].weight
    before = weight.detach().clone()
    optimizer.zero_grad()
    distiller(X).loss.backward()
    optimizer.step()
    assert not torch.equal(weight.detach(), before)


@pytest.mark.parametrize("make", [fitnet_distiller, crd_distiller], ids=["connector", "crd"])
def test_build_before_the_optimiser_puts_every_parameter_in_it(make):
    distiller = make()
    inputs = X if make is fitnet_distiller else torch.randn(4, 4)
    distiller.build(inputs)
    optimizer = torch.optim.Adam(distiller.trainable_parameters())
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    made = list(distiller.connectors.parameters()) + list(distiller.losses.parameters())
    assert made and all(id(p) in in_optimizer for p in made)
    extra = {} if make is fitnet_distiller else {"index": torch.tensor([0, 1, 2, 3])}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distiller(inputs, **extra)  # no new parameter, no error, no warning


def test_build_after_the_parameters_were_read_warns():
    distiller = fitnet_distiller()
    torch.optim.Adam(distiller.trainable_parameters())
    with pytest.warns(UserWarning, match="make the optimiser after build"):
        distiller.build(X)
    other = fitnet_distiller()
    other.trainable_parameters()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other.build(X, optimiser_follows=True)  # the caller makes its optimiser afterwards


def test_fit_after_the_parameters_were_read_builds_the_connector_without_warning():
    distiller = fitnet_distiller()
    sum(p.numel() for p in distiller.parameters())  # e.g. a user counting parameters
    data = ArrayDataset(torch.randn(8, 1, 5, 5), torch.zeros(8, dtype=torch.int64), list("abc"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(distiller, BatchLoader(data, batch_size=4), TrainConfig(epochs=1, progress=False))
    assert len(distiller.connectors) == 1
