"""The in-process simulator: gossip consensus, the two engines agreeing, determinism, faults."""

import math

import pytest
import torch

from fedmerge.config import load_config
from fedmerge.runtimes.local.simulator import Simulator
from fedmerge.threads import physical_cores

SMALL = ["model.options.hidden=[16]", "data.options={}", "train.batch_size=16"]


def sim(*sets: str) -> Simulator:
    return Simulator(load_config(None, [*SMALL, *sets]))


def strip(rows):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


@pytest.mark.parametrize("vectorize", ["always", "never"])
@pytest.mark.parametrize("topology", ["ring-8", "torus-4x4"])
def test_gossip_reaches_consensus_and_keeps_the_average(vectorize, topology):
    s = sim("protocol.name=gossip", "model.init=different", "train.epochs=0", "rounds=120",
            f"topology={topology}", f"vectorize={vectorize}")  # fmt: skip
    before = s.engine.flat()
    rows = s.run()
    after = s.engine.flat()
    first = max(r["consensus"] for r in rows if r["round"] == 1)
    last = max(r["consensus"] for r in rows if r["round"] == 120)
    assert first > 1.0 and last < 1e-5 * first
    assert torch.allclose(before.mean(0), after.mean(0), atol=1e-6)


FAULTY = ["faults.dropout=0.2", "faults.message_loss=0.3", "faults.straggler=0.2",
          "faults.crash=0.1", "faults.crash_rounds=2"]  # fmt: skip


ADAM = ["train.optimizer=adam", "train.lr=0.01", "train.weight_decay=0.01"]


@pytest.mark.parametrize(
    ("sets", "atol"),
    [
        (["protocol.name=gossip", "model.init=same", *FAULTY], 2e-5),
        (["protocol.name=gossip", "model.init=different", "train.momentum=0.9", "train.steps=3"],
         2e-5),
        # Adam's g/√v turns float noise in near-zero gradients into ±lr steps
        (["protocol.name=local", *ADAM], 2e-3),
        (["protocol.name=single_global_merge", "topology=ring-8"], 2e-5),
        (["protocol.name=centralized"], 2e-5),
    ],
)  # fmt: skip
def test_vectorized_and_per_agent_paths_agree(sets, atol):
    a, b = sim(*sets, "rounds=4", "vectorize=always"), sim(*sets, "rounds=4", "vectorize=never")
    assert (a.path, b.path) == ("vectorized", "per-agent")
    ra, rb = strip(a.run()), strip(b.run())
    assert [r["active"] for r in ra] == [r["active"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        for key in ("bytes_sent", "bytes_received", "rejected", "trained"):
            assert x[key] == y[key], key
        for key in ("global_acc", "local_acc"):
            assert (x[key] is None) == (y[key] is None)
            if x[key] is not None:
                assert x[key] == pytest.approx(y[key], abs=0.011), key  # ≤ 1 flipped argmax
        assert x["consensus"] == pytest.approx(y["consensus"], rel=1e-4, abs=1e-5)
    assert torch.allclose(a.engine.flat(), b.engine.flat(), atol=atol)


def test_same_seed_same_numbers_other_seed_other_numbers():
    rows = [strip(sim("rounds=3", f"seed={s}", *FAULTY).run()) for s in (5, 5, 6)]
    assert rows[0] == rows[1]
    assert rows[0] != rows[2]


def test_single_global_merge_ends_in_consensus():
    rows = sim("protocol.name=single_global_merge", "rounds=5").run()
    assert max(r["consensus"] for r in rows if r["round"] == 5) < 1e-5
    assert max(r["consensus"] for r in rows if r["round"] == 4) > 1e-3


def test_centralized_is_one_agent_on_all_data():
    s = sim("protocol.name=centralized", "rounds=2")
    assert s.setup.n == 1
    assert s.setup.data.agents[0].samples == sum(a.samples for a in sim().setup.data.agents)


@pytest.mark.parametrize("vectorize", ["always", "never"])
def test_rejected_payloads_are_counted_and_leave_state_as_local(vectorize):
    """A norm bound nothing passes: every payload is dropped, agents evolve as if local."""
    common = ["rounds=3", "model.init=different", f"vectorize={vectorize}"]
    strict = sim("protocol.name=gossip", "validation.max_norm_ratio=1e-9", *common)
    local = sim("protocol.name=local", *common)
    rows = strict.run()
    local.run()
    assert torch.equal(strict.engine.flat(), local.engine.flat())
    assert all(r["rejected"] == 2 for r in rows)  # both ring neighbours, every round
    assert all(r["bytes_received"] > 0 for r in rows)


def test_dropout_and_crash_keep_absent_agents_untouched():
    s = sim("rounds=6", "faults.dropout=0.3", "faults.crash=0.2", "vectorize=never")
    for r in range(6):
        before = s.engine.flat().clone()
        rows = s.round(r)
        after = s.engine.flat()
        for row in rows:
            if not row["active"]:
                assert torch.equal(before[row["agent"]], after[row["agent"]])
                assert row["bytes_sent"] == row["bytes_received"] == 0
    assert any(not row["active"] for row in s.rows)


def test_message_loss_reduces_traffic_received():
    full = sim("rounds=3").run()
    lossy = sim("rounds=3", "faults.message_loss=0.5").run()
    assert sum(r["bytes_sent"] for r in full) == sum(r["bytes_sent"] for r in lossy)
    got = sum(r["bytes_received"] for r in lossy) / sum(r["bytes_received"] for r in full)
    assert 0.3 < got < 0.7


def test_dimat_protocol_runs_on_the_per_agent_path():
    s = sim("protocol.name=dimat", "model.init=different", "rounds=2", "topology=ring-4")
    assert s.path == "per-agent"
    rows = s.run()
    assert len(rows) == 8 and all(math.isfinite(r["consensus"]) for r in rows)
    assert all(r["bytes_received"] == r["bytes_sent"] > 0 for r in rows)  # 2 in, 2 out


ACCURACIES = ("global_acc", "local_acc", "acc_trained", "disagreement")


@pytest.mark.parametrize("vectorize", ["always", "never"])
def test_eval_every_measures_only_its_rounds_and_changes_nothing_else(vectorize):
    common = ["rounds=7", "protocol.name=gossip", "model.init=different", f"vectorize={vectorize}"]
    every = strip(sim(*common).run())
    sparse = strip(sim(*common, "metrics.eval_every=3").run())
    measured = {r["round"] for r in sparse if r["global_acc"] is not None}
    assert measured == {3, 6, 7}
    for full, thin in zip(every, sparse, strict=True):
        for key in ACCURACIES:
            if thin["round"] in measured:
                assert thin[key] == full[key] is not None, key
            else:
                assert thin[key] is None, key
        rest = {k: v for k, v in thin.items() if k not in ACCURACIES}
        assert rest == {k: v for k, v in full.items() if k not in ACCURACIES}


def test_local_runtime_applies_and_records_its_thread_count():
    from fedmerge.runtimes.local import run

    before = torch.get_num_threads()
    seen, details = [], {}
    cfg = load_config(None, [*SMALL, "rounds=2", "threads=0"])
    run(cfg, on_round=lambda rows: seen.append(torch.get_num_threads()), details=details)
    assert seen == [physical_cores()] * 2 and details["threads"] == physical_cores()
    assert torch.get_num_threads() == before
    run(load_config(None, [*SMALL, "rounds=1", "vectorize=never"]), details=details)
    assert details["threads"] == 1 and details["path"] == "per-agent"  # the default


def test_auto_picks_the_stacked_engine_where_it_applies():
    """vectorize: auto → the stacked engine for a buffer-free MLP (it was faster per round at
    10k and 1M parameters, benchmarks/flower_overhead.py), per-agent for BatchNorm models."""
    assert sim("rounds=1").path == "vectorized"
    cnn = sim("rounds=1", "model.name=cnn", "model.options={channels: [4]}")
    assert cnn.path == "per-agent"


def test_stacked_storage_follows_the_gradients_and_reads_back_in_parameter_order():
    """After the first step every weight is stored in its gradient's memory order (the
    transposed layout of a vmapped linear layer), and flat(), states() and distances()
    still read the parameters in their own order."""
    from fedmerge.decentralized.consensus import distances, flat_state

    s = sim("rounds=2", "model.init=different", "vectorize=always")
    s.run()
    e = s.engine
    weight = e.params["head.weight"]
    assert weight.stride()[1] < weight.stride()[2]  # column-major per agent, like its gradient
    assert e.theta.is_contiguous() and e.params["head.weight"].data_ptr() >= e.theta.data_ptr()
    states = torch.stack([flat_state(st) for st in e.states()])
    assert torch.equal(e.flat(), states)
    assert e.distances() == pytest.approx(distances(e.flat()), rel=1e-12)


@pytest.mark.parametrize("vectorize", ["always", "never"])
def test_a_nonfinite_agent_is_rejected_by_its_neighbours_on_both_engines(vectorize):
    s = sim("rounds=2", "protocol.name=gossip", "topology=ring-8", f"vectorize={vectorize}")
    if vectorize == "always":
        s.engine.params["head.bias"][0, 0] = float("nan")
    else:
        with torch.no_grad():
            s.engine.agents[0].model.get_parameter("head.bias")[0] = float("nan")
    rows = s.round(0)
    # 0's two ring neighbours reject it; 0 itself accepts theirs (its own norm bound is NaN,
    # and validate_payload rejects only a norm that exceeds the bound)
    assert [r["rejected"] for r in rows] == [0, 1, 0, 0, 0, 0, 0, 1]
    flat = s.engine.flat()
    assert not torch.isfinite(flat[0]).all() and torch.isfinite(flat[1:]).all()


@pytest.mark.parametrize("vectorize", ["always", "never"])
@pytest.mark.parametrize(
    "sets",
    [
        ["topology=ring-8", *FAULTY],
        ["topology={graph: ring, n: 12, schedule: one_peer_exponential}", "agents=12",
         "faults.dropout=0.2", "faults.message_loss=0.2"],
        ["topology={graph: ring, n: 8, schedule: random_matching}", "faults.message_loss=0.3"],
        ["topology=torus-4x4", "agents=16", "model.init=different",
         "validation.max_norm_ratio=1.0"],  # some payloads rejected, some not
    ],
)  # fmt: skip
def test_rows_are_identical_with_and_without_the_plan_cache(sets, vectorize, monkeypatch):
    """The topology's plan cache and the stacked engine's reuse of W change no number: every
    row (but its wall time) is bit-identical to a run that rebuilds every round's plan."""
    common = [*sets, "rounds=6", f"vectorize={vectorize}"]
    cached = sim(*common)
    rows = strip(cached.run())
    monkeypatch.setattr("fedmerge.topology.build.PLAN_CACHE", 0)
    fresh = sim(*common)
    assert strip(fresh.run()) == rows
    assert torch.equal(cached.engine.flat(), fresh.engine.flat())
    assert not fresh.setup.topology._plans
    if "random_matching" not in sets[0]:
        assert cached.setup.topology._plans  # the cache was used
    if "max_norm_ratio" in sets[-1]:
        assert 0 < sum(r["rejected"] for r in rows) < 4 * len(rows)  # of 4 neighbours each
