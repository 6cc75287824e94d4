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


def test_the_config_path_refuses_an_unused_head_on_several_ranks_only():
    """What train.py runs before any run directory (builders.probe): refused where DDP would wrap the
    model on several ranks, accepted on one rank or with the key."""
    from ddp_seq.builders import DataParts
    from ddp_seq.builders import probe as config_probe
    from ddp_seq.config import load_config

    train, val = make_datasets(num_train=8, num_val=2)
    data = DataParts(train, val, 3, 3, 0)
    cfg = load_config(None, [f"model.target={WORKER}:UnusedHead"])
    with pytest.raises(UserError, match=r"^model.target: 2 of 10 trainable parameters get no gradient"):
        config_probe(UnusedHead(3, 3), data, cfg, torch.device("cpu"), world_size=2)
    config_probe(UnusedHead(3, 3), data, cfg, torch.device("cpu"), world_size=1)
    cfg.distributed.find_unused_parameters = True
    config_probe(UnusedHead(3, 3), data, cfg, torch.device("cpu"), world_size=2)


@pytest.mark.slow
def test_two_ranks_train_an_unused_head_with_the_key(tmp_path):
    """The refusal is the probe's (above); with distributed.find_unused_parameters=true DDP trains the
    model on 2 real ranks (without it DDP fails, as the bug report shows: 'Expected to have finished
    reduction in the prior iteration')."""
    model = f"model.target={WORKER}:UnusedHead"
    torchrun("train.py", *SMALL, model, "distributed.find_unused_parameters=true", f"logging.root={tmp_path}",
             "logging.name=yes", nproc=2).check()
    assert (tmp_path / "yes" / "checkpoints" / "last.pt").is_file()
