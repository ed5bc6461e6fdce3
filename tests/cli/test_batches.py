"""Issue 14: a later batch that the model or the loss rejects is one line naming it (index and shapes), exit 2."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secondorder.cli import main
from secondorder.cli.batches import WatchedBatches, naming_the_batch
from secondorder.cli.common import UsageError

FAST = ["--probes", "9", "--quiet"]
ANALYZE = ["analyze", "--top-k", "2", "--slq-probes", "1", "--slq-steps", "8", "--no-landscape", *FAST]


@pytest.mark.parametrize("command", [ANALYZE, ["quantize", *FAST],
                                     [*ANALYZE, "--checkpoint", "first.pt", "--checkpoint", "last.pt"]],
                         ids=["analyze", "quantize", "analyze-evolution"])
@pytest.mark.parametrize("data, message", [
    ("later_wrong_inputs", "batch 2 of --data (inputs [5, 7], targets [5]; batch 0 has inputs [25, 4], targets [25])"),
    ("later_wrong_targets", "batch 1 of --data (inputs [15, 4], targets [15, 2]; batch 0 has inputs [25, 4], "
                            "targets [25])"),
], ids=["inputs", "targets"])
def test_a_later_batch_that_does_not_fit_is_one_line_naming_it(project, capsys, command, data, message):
    root, _ = project
    before = sorted(p.name for p in root.iterdir())
    assert main([*command, "--model", "clinets:make_net", "--data", f"clinets:{data}", "--out", "rep"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("secondorder: error: the model rejected") and len(err.splitlines()) == 1, err
    assert message in err and "RuntimeError" in err, err
    assert sorted(p.name for p in root.iterdir()) == before


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3))


BATCHES = [(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long)), (torch.zeros(3, 5), torch.zeros(3, dtype=torch.long))]


def _pass(model: nn.Module, data) -> None:
    for x, y in data:
        F.cross_entropy(model(x), y)


def test_an_error_of_the_library_on_a_later_batch_keeps_its_traceback():
    data = WatchedBatches(BATCHES, BATCHES[0])

    def library_bug():
        for index, _ in enumerate(data):
            if index == 1:
                raise ValueError("an internal bug")

    with pytest.raises(ValueError, match="an internal bug"), naming_the_batch(_model(), F.cross_entropy, data):
        library_bug()


def test_the_first_batch_keeps_its_traceback_and_a_copy_of_the_model_is_the_model():
    model, reverse = _model(), WatchedBatches(BATCHES[::-1], BATCHES[1])
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"), \
            naming_the_batch(model, F.cross_entropy, reverse):
        _pass(model, reverse)  # batch 0 passed the up-front check (in the commands): not its data's fault
    data = WatchedBatches(BATCHES, BATCHES[0])
    with pytest.raises(UsageError, match=r"batch 1 of --data \(inputs \[3, 5\]"), \
            naming_the_batch(model, F.cross_entropy, data):
        _pass(nn.Sequential(nn.Linear(4, 3)), data)  # a deep copy, as hessian_evolution and quantize make


def test_a_shard_names_the_batches_by_their_index_in_the_data():
    data = WatchedBatches([BATCHES[0], BATCHES[1]], BATCHES[0], numbers=range(1, 5, 2))
    with pytest.raises(UsageError, match="batch 3 of --data"), naming_the_batch(_model(), F.cross_entropy, data):
        _pass(_model(), data)
    assert data.current is not None and len(data) == 2 and data[1] is BATCHES[1]


def test_watched_batches_iterate_as_the_batches_and_forget_after_a_full_pass():
    data = WatchedBatches(BATCHES, BATCHES[0])
    assert list(data) == BATCHES and list(data) == BATCHES and data.current is None


def test_a_process_shard_of_the_users_batches_keeps_their_indices():
    from secondorder.cli.analyze import _watched_shard
    from secondorder.distributed import World
    from secondorder.distributed.reducer import Reducer

    class Rank1Of2(Reducer):
        world = World(1, 2, "gloo", 60.0)

    batches = [(torch.full((2, 4), float(i)), torch.zeros(2, dtype=torch.long)) for i in range(4)]
    shard = _watched_shard(WatchedBatches(batches, batches[0]), Rank1Of2())
    assert list(shard) == [batches[1], batches[3]] and list(shard.numbers) == [1, 3] and shard.first is batches[0]
    assert _watched_shard(batches, Rank1Of2()) == [batches[1], batches[3]]  # the default model's: a plain list
