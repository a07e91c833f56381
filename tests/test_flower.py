"""The Flower runtime: the relay + ClientApp give the in-process simulator's numbers.

Fast tests drive the real ServerApp logic (:func:`relay`) and the real ClientApp over a
loopback ``Grid`` that hands each message straight to the ClientApp (no Ray), so faults,
silent nodes and corrupted payloads are cheap to test. The slow tests go through Flower's
simulation engine (Ray) and ``flwr run``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedmerge.config import default_config, load_config
from fedmerge.decentralized.metrics import IN_PROCESS_ONLY
from fedmerge.errors import ConfigError
from fedmerge.runtimes.flower.client_app import app as client_app
from fedmerge.runtimes.flower.records import blob_array
from fedmerge.runtimes.flower.relay import FlowerTimeout, RelayOptions, check_reply, relay
from fedmerge.runtimes.flower.server_app import config_from_run, run_options
from fedmerge.runtimes.local.simulator import Simulator

RING4 = ["topology=ring-4", "rounds=3", "model.options.hidden=[16]", "train.steps=2",
         "vectorize=never"]  # fmt: skip
Hook = Callable[[int, int, Message], Message | None]


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    """Messages are stamped with the sending task's identity, which Flower sets per process."""
    for attr, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


class LoopbackGrid(Grid):
    """A Grid whose n nodes run :data:`client_app` in this process, one Context each.

    ``hook(step, partition, message)`` may return a changed message, or None: the node
    stays silent (as if it timed out).
    """

    def __init__(self, n: int, hook: Hook | None = None, configs: list[dict] | None = None):
        self.hook = hook or (lambda step, pid, msg: msg)
        self.replies: list[Message] = []
        self.contexts = {
            1000 + i: Context(7, 1000 + i, cfg, RecordDict(), {})
            for i, cfg in enumerate(configs or [{"partition-id": i} for i in range(n)])
        }

    def set_run(self, run):  # pragma: no cover - the relay never calls these
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages) -> list[str]:
        """Runs each message's ClientApp at once; its reply waits for :meth:`pull_messages`."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as Flower stamps it
            ids.append(msg.metadata.message_id)
            ctx = self.contexts[msg.metadata.dst_node_id]
            if msg.metadata.message_type == "train.step":
                step = int(msg.content.config_records["step"]["step"])
                msg = self.hook(step, int(ctx.node_config.get("partition-id", -1)), msg)
                if msg is None:
                    continue
            try:
                self.replies.append(client_app(msg, ctx))
            except Exception as exc:  # Flower turns a ClientApp exception into an error reply
                self.replies.append(Message(Error(1, repr(exc)), reply_to=msg))
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        wanted = set(message_ids)
        got = [m for m in self.replies if m.metadata.reply_to_message_id in wanted]
        self.replies = [m for m in self.replies if m not in got]
        return got

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover
        raise NotImplementedError  # the relay pushes and pulls itself


def run_both(sets: list[str], tmp_path, hook: Hook | None = None):
    cfg = load_config(None, RING4 + sets)
    sim = Simulator(cfg)
    ref, grid = sim.run(), LoopbackGrid(sim.setup.n, hook)
    return ref, relay(grid, cfg, RelayOptions(timeout=1.0, state_dir=str(tmp_path)), None)


def assert_same_rows(ref: list[dict], rows: list[dict], tol: float = 1e-6) -> None:
    assert len(rows) == len(ref)
    for a, b in zip(ref, rows, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if key == "wall_s" or key in IN_PROCESS_ONLY:
                continue
            if isinstance(a[key], float):
                assert b[key] == pytest.approx(a[key], abs=tol), (a["round"], a["agent"], key)
            else:
                assert b[key] == a[key], (a["round"], a["agent"], key)


def test_gossip_matches_the_simulator(tmp_path):
    ref, rows = run_both([], tmp_path)
    assert_same_rows(ref, rows)
    assert all(r["bytes_received"] > 0 for r in rows)  # payloads did travel


def test_lora_agents_match_the_simulator(tmp_path):
    pytest.importorskip("peft")
    lora = ["model.name=hf", "model.options={}", "peft.r=2", "peft.lora_merge=product"]
    ref, rows = run_both(lora, tmp_path)
    assert_same_rows(ref, rows)
    assert rows[0]["bytes_sent"] < 20_000  # the adapter only (full weights: ~146 kB)


@pytest.mark.parametrize("codec", ["topk", "lowrank"])
def test_compressed_gossip_matches_the_simulator(tmp_path, codec):
    """CHOCO-Gossip with a codec: the nodes' public copies and codec state survive the
    per-step rebuild (agent-state file), and the encoded bytes are what is counted."""
    dense, _ = run_both([], tmp_path / "dense")
    ref, rows = run_both([f"protocol.codec={codec}", "protocol.codec_params={}",
                          "protocol.consensus_step=0.5"], tmp_path / codec)  # fmt: skip
    assert_same_rows(ref, rows)
    assert 0 < sum(r["bytes_sent"] for r in rows) < sum(r["bytes_sent"] for r in dense) / 2


def test_compressed_gossip_key_frames_under_loss_match_the_simulator(tmp_path):
    """CHOCO key frames (``protocol.choco_resync``) with lost messages: the same rows; the
    key-frame rounds (2, 4) carry 8-bit snapshots, more bytes than the top-k rounds."""
    sets = [
        "protocol.codec=topk",
        "protocol.codec_params={density: 0.1}",
        "rounds=4",
        "protocol.consensus_step=0.5",
        "protocol.choco_resync=2",
        "faults.message_loss=0.3",
    ]
    ref, rows = run_both(sets, tmp_path)
    assert_same_rows(ref, rows)
    sent = {r: max(x["bytes_sent"] for x in rows if x["round"] == r) for r in (1, 2, 3, 4)}
    assert min(sent[2], sent[4]) > 1.5 * max(sent[1], sent[3])


def test_dimat_matches_the_simulator(tmp_path):
    ref, rows = run_both(["protocol.name=dimat", "model.init=different"], tmp_path)
    assert_same_rows(ref, rows)


def test_time_varying_schedules_are_followed(tmp_path):
    ref, rows = run_both(["protocol.name=single_global_merge", "topology=ring-8"], tmp_path)
    assert_same_rows(ref, rows)
    last = [r["bytes_received"] for r in rows if r["round"] == 3]  # the complete final merge
    assert len(set(last)) == 1 and last[0] == rows[-1]["bytes_sent"] > 0
    assert max(r["bytes_received"] for r in rows if r["round"] == 1) < last[0]


def test_faults_follow_the_simulators_fault_model(tmp_path):
    faults = ["faults.dropout=0.3", "faults.message_loss=0.3", "faults.straggler=0.3",
              "rounds=4"]  # fmt: skip
    ref, rows = run_both(faults, tmp_path)
    assert_same_rows(ref, rows)
    assert not all(r["active"] for r in rows) and not all(r["trained"] for r in rows)


@pytest.mark.parametrize("codec", ["none", "ternary"])
def test_disseminate_matches_the_simulator(tmp_path, codec):
    """Continual dissemination: each node's agent (its continual merge, held and fresh
    experts, encoded ones with a codec) lives in its state file between steps; same folded
    experts, accuracies and (encoded) bytes."""
    sets = ["protocol.name=disseminate", "rounds=3", f"protocol.codec={codec}"]
    ref, rows = run_both(sets, tmp_path)
    assert_same_rows(ref, rows)
    assert [sorted(r["experts"]) for r in rows if r["round"] == 3] == [[0, 1, 2, 3]] * 4


def test_local_protocol_sends_nothing(tmp_path):
    ref, rows = run_both(["protocol.name=local"], tmp_path)
    assert_same_rows(ref, rows)
    assert sum(r["bytes_sent"] for r in rows) == 0


def test_a_silent_node_is_skipped_and_its_neighbours_go_on(tmp_path):
    def silence_2(step, pid, msg):
        return None if pid == 2 and step >= 1 else msg

    _, rows = run_both([], tmp_path, silence_2)
    by = {(r["round"], r["agent"]): r for r in rows}
    assert by[1, 2]["active"] and by[1, 2]["global_acc"] is None  # sent, never evaluated
    for r in (2, 3):
        assert not by[r, 2]["active"] and by[r, 2]["consensus"] is None
        assert by[r, 2]["bytes_sent"] == by[r, 2]["bytes_received"] == 0
        for j in (1, 3):  # node 2's neighbours merge with their other neighbour only
            assert by[r, j]["global_acc"] is not None
            assert by[r, j]["bytes_received"] == by[r, 0]["bytes_sent"] // 2
    assert by[3, 0]["bytes_received"] == 2 * by[3, 1]["bytes_received"]


def test_a_corrupted_payload_is_rejected_and_counted(tmp_path):
    def corrupt(step, pid, msg):
        inbox = msg.content.array_records["inbox"]
        if pid == 0 and step == 2 and "1" in inbox:
            blob = bytearray(inbox["1"].data)
            blob[-1] ^= 0xFF  # flip bits of the last tensor byte: the content hash breaks
            inbox["1"] = Array(dtype="uint8", shape=(len(blob),), stype="safetensors",
                               data=bytes(blob))  # fmt: skip
        return msg

    ref, rows = run_both([], tmp_path, corrupt)
    by = {(r["round"], r["agent"]): r for r in rows}
    assert by[2, 0]["rejected"] == 1 and sum(r["rejected"] for r in rows) == 1
    assert by[1, 0]["global_acc"] == ref[0]["global_acc"]  # round 1 untouched
    assert by[3, 0]["global_acc"] is not None  # the run went on


class RecordingGrid(LoopbackGrid):
    """A :class:`LoopbackGrid` that keeps every reply the relay pulled, in order."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.pulled: list[Message] = []

    def pull_messages(self, message_ids) -> list[Message]:
        got = super().pull_messages(message_ids)
        self.pulled += got
        return got


def test_a_reply_ships_the_flat_state_once_in_the_models_dtype(tmp_path):
    """Step 0 ships the payload only, steps 1..R−1 the payload and the flat state, step R
    the flat state only; the flat state is float32, 4 bytes a parameter (float64 doubled
    it), and the consensus distances from it are the simulator's."""
    cfg = load_config(None, RING4)
    grid = RecordingGrid(4)
    rows = relay(grid, cfg, RelayOptions(timeout=1.0, state_dir=str(tmp_path)), None)
    assert_same_rows(Simulator(cfg).run(), rows)
    params = 64 * 16 + 16 + 16 * 10 + 10
    steps = [grid.pulled[i : i + 4] for i in range(4, len(grid.pulled), 4)]  # after the query
    assert len(steps) == cfg.rounds + 1
    for k, replies in enumerate(steps):
        for reply in replies:
            arrays = reply.content.array_records["arrays"]
            assert sorted(arrays) == [*(["flat"] if k else []), *(["payload"] if k < 3 else [])]
            if k:
                blob = bytes(arrays["flat"].data)
                flat = st_load(blob)["flat"]
                assert flat.dtype == torch.float32 and flat.shape == (params,)
                assert 4 * params < len(blob) < 4 * params + 100  # the header: < 100 bytes


@pytest.mark.parametrize(
    ("dtype", "value", "why"),
    [
        (torch.float16, 1.0, None),
        (torch.bfloat16, 1.0, None),
        (torch.float64, 1.0, None),
        (torch.float16, float("inf"), "expected (5,) finite"),
        (torch.int32, 1, "dtype torch.int32"),
        (torch.float8_e4m3fn, 1.0, "unsupported dtype 'F8_E4M3'"),  # by the header check
    ],
)
def test_the_relay_takes_a_flat_state_only_in_a_float_dtype(dtype, value, why):
    flat = torch.full((5,), value, dtype=torch.float32).to(dtype)
    rec = RecordDict({"arrays": ArrayRecord({"flat": blob_array(st_save({"flat": flat}))}),
                      "metrics": MetricRecord({})})  # fmt: skip
    got = check_reply(rec, 5)
    if why is None:
        assert got.flat.dtype == dtype and got.flat.double().tolist() == [1.0] * 5
    else:
        assert isinstance(got, str) and why in got, got


def test_every_topology_node_needs_a_partition_id(tmp_path):
    grid = LoopbackGrid(4, configs=[{"partition-id": 0}, {}, {"partition-id": 2},
                                    {"partition-id": 3}])  # fmt: skip
    cfg = load_config(None, RING4)
    with pytest.raises(ConfigError, match=r"partition-id \[1\]"):
        relay(grid, cfg, RelayOptions(state_dir=str(tmp_path), connect_timeout=1), None)


def test_connect_timeout_scales_with_nodes_and_names_what_was_seen(tmp_path):
    cfg = load_config(None, RING4)
    assert (cfg.flower.connect_timeout(4), cfg.flower.connect_timeout(100)) == (140.0, 620.0)
    assert load_config(None, ["flower.connect_timeout_s=5"]).flower.connect_timeout(100) == 5
    opts = RelayOptions(state_dir=str(tmp_path), connect_timeout=0.5)
    msg = r"after 0.5 s, 3 of the 4 SuperNodes .* \(Flower node ids \[1000, 1001, 1002\]\)"
    with pytest.raises(FlowerTimeout, match=msg):
        relay(LoopbackGrid(3), cfg, opts, None)


def test_the_flower_app_has_a_static_version_equal_to_the_package():
    """``flwr run .`` refuses a pyproject.toml without ``[project] version``."""
    import tomllib
    from pathlib import Path

    import fedmerge

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert project["version"] == fedmerge.__version__ and "dynamic" not in project


def test_run_config_names_config_overrides_and_output(tmp_path):
    (tmp_path / "sim.yaml").write_text("rounds: 7\ntopology: ring-4\n")
    run_config = {"config": "sim.yaml", "overrides": "seed=3 'model.options.hidden=[8, 8]'",
                  "out-dir": str(tmp_path / "out"), "timeout": 2.5}  # fmt: skip
    cfg, out = config_from_run(run_config, tmp_path)
    assert (cfg.rounds, cfg.seed, cfg.model.options["hidden"]) == (7, 3, [8, 8])
    assert out == tmp_path / "out"
    assert run_options(run_config).timeout == 2.5 and run_options({}).timeout is None
    default, out = config_from_run({"overrides": "rounds=2"}, tmp_path)
    assert default.rounds == 2 and out.name == "default-flower"
    with pytest.raises(ConfigError, match="seed"):
        config_from_run({"overrides": "seed=x"}, tmp_path)


@pytest.mark.slow
def test_flower_simulation_engine_matches_the_simulator():
    """Gossip through Ray: accuracies equal; consensus to 1e-6 (Ray's workers run torch on
    one thread, which moves float32 sums by a few ulps: ~1e-10 here)."""
    from fedmerge.runtimes import flower

    cfg = load_config(None, RING4)
    ref = Simulator(cfg).run()
    seen: list[list[dict]] = []
    rows = flower.run(cfg, on_round=seen.append, timeout=300)
    assert_same_rows(ref, rows)
    assert [len(r) for r in seen] == [4, 4, 4] and seen[-1][0]["round"] == 3


@pytest.mark.slow
def test_simulate_cli_runs_dimat_on_flower(tmp_path, capsys):
    import json

    from fedmerge.cli import main

    sets = RING4 + ["protocol.name=dimat", "model.init=different"]
    args = [a for s in sets for a in ("--set", s)]
    assert main(["simulate", *args, "--runtime", "flower", "--out", str(tmp_path), "--quiet"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert_same_rows(Simulator(default_config(sets)).run(), rows)  # simulate's base config
    assert json.loads((tmp_path / "summary.json").read_text())["runtime"] == "flower"


@pytest.mark.slow
def test_simulate_cli_runs_disseminate_on_flower_quietly(tmp_path, capfd):
    """Continual dissemination through ``fedmerge simulate --runtime flower`` (Ray): the
    in-process rows (folded experts in order, accuracies); Flower's INFO logs stay out of
    stderr without --verbose."""
    import json

    from fedmerge.cli import main

    sets = RING4 + ["protocol.name=disseminate"]
    args = [a for s in sets for a in ("--set", s)]
    assert main(["simulate", *args, "--runtime", "flower", "--out", str(tmp_path), "--quiet"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert_same_rows(Simulator(default_config(sets)).run(), rows)
    assert [sorted(r["experts"]) for r in rows if r["round"] == 3] == [[0, 1, 2, 3]] * 4
    err = capfd.readouterr().err
    assert not [line for line in err.splitlines() if line.startswith("INFO")], err[-2000:]
