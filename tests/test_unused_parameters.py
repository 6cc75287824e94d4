"""A model with a parameter the loss never reaches (issue 26, row 5): the probe runs a backward pass
and names such parameters before the first step (exit 2) where DDP would wait for their gradients
and fail ("Expected to have finished reduction ..."); ``distributed.find_unused_parameters=true``
trains it. The probe itself changes nothing training does: gradients and RNG states are restored.
"""

from __future__ import annotations

import pytest
import torch
from helpers import torchrun
from workers.user_parts import MeanPoolGRU, UnusedHead, make_datasets

from ddp_seq.errors import UserError
from ddp_seq.train.contract import needs_every_gradient, probe
from ddp_seq.train.objective import as_objective

WORKER = "tests/workers/user_parts.py"
SMALL = [f"data.target={WORKER}:make_datasets", "batching.batch_size=16", "training.epochs=1",
         "logging.progress=lines", "distributed.backend=gloo", "data.num_workers=0"]


def test_the_probe_names_parameters_without_gradient():
    train, _ = make_datasets(num_train=8, num_val=2)
    model = UnusedHead(3, 3)  # ToySequences: 3 features, 3 classes
    with pytest.raises(UserError) as e:
        probe(model, train, as_objective("classify"), "ddp", torch.device("cpu"), key="model.target",
              every_parameter=True)
    text = str(e.value)
    assert "2 of 10 trainable parameters get no gradient" in text and "aux_head.weight, aux_head.bias" in text
    assert "distributed.find_unused_parameters=true" in text and text.startswith("model.target: ")
    probe(model, train, as_objective("classify"), "ddp", torch.device("cpu"))  # allowed: no refusal
    model.aux_head.weight.requires_grad_(False)  # frozen parameters need no gradient
    model.aux_head.bias.requires_grad_(False)
    probe(model, train, as_objective("classify"), "ddp", torch.device("cpu"), every_parameter=True)


class WithDropout(MeanPoolGRU):
    """Draws from the RNG in train mode (the probe runs the model in train mode)."""

    def forward(self, inputs, lengths):
        return torch.nn.functional.dropout(super().forward(inputs, lengths), 0.5, self.training)


def test_the_probe_leaves_gradients_rng_and_mode_as_they_were():
    train, _ = make_datasets(num_train=8, num_val=2)
    model = WithDropout(3, 3)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    model.eval()
    before = torch.get_rng_state()
    probe(model, train, as_objective("classify"), "ddp", torch.device("cpu"), every_parameter=True)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())
    assert not model.training


@pytest.mark.parametrize("mode, world_size, flag, needed", [
    ("ddp", 2, False, True), ("ddp", 2, True, False), ("ddp", 1, False, False), ("dp", 1, False, False),
])
def test_which_jobs_need_every_gradient(mode, world_size, flag, needed):
    assert needs_every_gradient(mode, world_size, flag) is needed


@pytest.mark.slow
def test_two_ranks_refuse_an_unused_head_or_train_it_with_the_key(tmp_path):
    model = f"model.target={WORKER}:UnusedHead"
    refused = torchrun("train.py", *SMALL, model, f"logging.root={tmp_path}", "logging.name=no", nproc=2)
    assert refused.returncode != 0, refused.report()
    lines = [x for x in refused.stderr.splitlines() if x.startswith("ddp-seq: error:")]
    assert len(lines) == 1 and "aux_head.weight, aux_head.bias" in lines[0], refused.report()
    assert "Expected to have finished reduction" not in refused.stderr + refused.stdout
    assert not (tmp_path / "no").exists()  # refused before any run directory
    torchrun("train.py", *SMALL, model, "distributed.find_unused_parameters=true", f"logging.root={tmp_path}",
             "logging.name=yes", nproc=2).check()
    assert (tmp_path / "yes" / "checkpoints" / "last.pt").is_file()
