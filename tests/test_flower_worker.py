"""The pieces behind a fast Flower deployment, in process: nodes with their own files answer
the relay with the simulator's rows, an agent kept in memory equals one restored from its
state file, and the SuperNode poll launcher changes only what it should."""

from __future__ import annotations

import importlib
import json
import time
from types import ModuleType

import pytest
from flwr.app import Context, Error, Message, RecordDict

from fedmerge.config import load_config
from fedmerge.decentralized.nodedirs import export_split
from fedmerge.runtimes.flower.polling import CappedSleep, cap_sleeps, pulls_until, quick_pulls
from fedmerge.runtimes.flower.relay import RelayOptions, relay
from fedmerge.runtimes.flower.supernode import split_poll
from fedmerge.runtimes.local.simulator import Simulator
from tests.test_flower import RING4, LoopbackGrid, assert_same_rows, server_identity  # noqa: F401

# the module (the package's attribute of that name is the ClientApp object)
client_app = importlib.import_module("fedmerge.runtimes.flower.client_app")


@pytest.mark.parametrize("init", ["same", "different"])
def test_nodes_with_their_own_files_give_the_simulators_rows(tmp_path, init):
    cfg = load_config(None, [*RING4, f"model.init={init}"])
    files = export_split(cfg, tmp_path / "nodes")
    grid = LoopbackGrid(4, configs=[{"node-file": str(f)} for f in reversed(files)])
    rows = relay(grid, cfg, RelayOptions(timeout=1.0, state_dir=str(tmp_path / "x")), None)
    assert_same_rows(Simulator(cfg).run(), rows)
    for i, f in enumerate(files):  # each node's state went to its node file's state_dir
        assert (f.parent / "state" / "run-7" / f"agent-{i:04d}.safetensors").exists()
    assert not (tmp_path / "x").exists()


def test_an_agent_kept_in_memory_equals_one_restored_from_its_file(tmp_path, monkeypatch):
    choco = ["protocol.codec=topk", "protocol.codec_params={}", "protocol.consensus_step=0.5"]
    cfg = load_config(None, [*RING4, *choco])  # the codec's state is kept too
    runs = []
    for size in (0, 8):  # 0: every step restores from the file; 8: every step is a hit
        monkeypatch.setattr(client_app, "AGENTS", client_app.AgentCache(size))
        opts = RelayOptions(timeout=1.0, state_dir=str(tmp_path / f"cache-{size}"))
        runs.append(relay(LoopbackGrid(4), cfg, opts, None))
    assert_same_rows(runs[0], runs[1], tol=0)
    assert len(client_app.AGENTS.items) == 4


def test_a_failed_step_drops_the_kept_agent(tmp_path):
    cache = client_app.AgentCache(2)
    setup = client_app.cached_setup(_config_json(load_config(None, RING4)))
    agent = cache.take(setup, 1, tmp_path, 0)
    cache.put(agent, tmp_path, 0)
    assert cache.take(setup, 1, tmp_path, 1) is agent  # the step after the saved one: a hit
    again = cache.take(setup, 1, tmp_path, 1)  # taken and not put back (the step failed)
    assert again is not agent and again.state().keys() == agent.state().keys()


def _config_json(cfg) -> str:
    return json.dumps(cfg.to_dict())


def test_supernode_poll_launcher_caps_sleeps_and_passes_flowers_arguments(monkeypatch):
    assert split_poll(["--insecure", "--poll-s", "0.1", "--port", "9"]) == (
        0.1, ["--insecure", "--port", "9"])  # fmt: skip
    assert split_poll(["--poll-s=0.5"])[0] == 0.5 and split_poll([])[0] == 0.2
    with pytest.raises(SystemExit, match="outside"):
        split_poll(["--poll-s", "10"])
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    CappedSleep(0.2).sleep(3)  # the idle poll
    CappedSleep(0.2).sleep(0.5)  # waiting for its ClientApp's reply
    CappedSleep(0.2, wait=0.3).sleep(0.1)
    assert slept == [0.2, 0.01, 0.1] and CappedSleep(1).monotonic is time.monotonic
    from flwr.supernode import start_client_internal

    assert start_client_internal.time is time  # the loop fedmerge knows (flwr 1.41)
    with pytest.raises(RuntimeError, match="not the one fedmerge knows"):
        cap_sleeps(ModuleType("elsewhere"), 0.1)


def test_quick_pulls_retries_missing_objects_soon(monkeypatch):
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    module = ModuleType("puller")
    module.pull_objects = inflatable_utils.pull_objects
    quick_pulls(module)
    quick_pulls(module)  # idempotent
    assert module.pull_objects.keywords == {"initial_backoff": 0.01, "backoff_cap": 0.05,
                                            "max_tries_per_object": None}  # fmt: skip
    tries = []

    def pull(object_id: str) -> bytes:  # pushed after the third ask
        tries.append(object_id)
        if len(tries) <= 3:
            raise ObjectUnavailableError(object_id)
        return b"x"

    assert module.pull_objects(["a"], pull) == {"a": b"x"} and len(tries) == 4
    with pytest.raises(RuntimeError, match="not Flower 1.41's"):
        quick_pulls(ModuleType("elsewhere"))


def test_the_worker_pulls_task_input_quickly(monkeypatch):
    """Flower's ``pull_task_input`` passes no backoff, so the worker's partial applies (a
    partial of ``pull_objects`` would be overridden by the explicit defaults in between)."""
    from flwr.supernode.runtime import run_clientapp

    from fedmerge.runtimes.flower.polling import QUICK_PULLS

    name = "pull_and_inflate_object_from_tree"
    monkeypatch.setattr(run_clientapp, name, getattr(run_clientapp, name))  # put back after
    quick_pulls(run_clientapp, name)
    assert run_clientapp.pull_and_inflate_object_from_tree.keywords == QUICK_PULLS


def step_of(msg) -> int | None:
    """The relay step a message carries (None: the partition query)."""
    step = msg.content.config_records.get("step")
    return None if step is None else int(step["step"])


class Restarting(LoopbackGrid):
    """Flower node 1002 (topology node 2) dies at step 2; node ``new_id`` with node config
    ``claims`` connects right after (a restarted SuperNode registers under a new id)."""

    def __init__(self, new_id: int, claims: int):
        super().__init__(4)
        self.new_id, self.revived = new_id, False
        self.contexts[new_id] = Context(7, new_id, {"partition-id": claims}, RecordDict(), {})

    def get_node_ids(self):
        return [i for i in self.contexts if i != self.new_id or self.revived]

    def push_messages(self, messages):
        live = []
        for m in messages:
            if m.metadata.dst_node_id == 1002 and (step_of(m) or 0) >= 2:
                self.revived = True  # the message is lost with the node
                m.metadata.__dict__["_message_id"] = m.object_id
            else:
                live.append(m)
        return [*super().push_messages(live), *(m.object_id for m in messages if m not in live)]


def test_a_restarted_node_is_mapped_again_and_goes_on_from_its_file(tmp_path):
    cfg = load_config(None, RING4)  # 3 rounds: steps 0..3
    opts = RelayOptions(timeout=0.5, state_dir=str(tmp_path))
    by = {(r["round"], r["agent"]): r for r in relay(Restarting(2002, 2), cfg, opts, None)}
    assert by[2, 2]["global_acc"] is None and not by[3, 2]["active"]  # step 2 was lost
    assert by[3, 2]["global_acc"] is not None  # step 3: node 2 is back, from its file
    assert by[3, 1]["bytes_received"] == by[3, 0]["bytes_received"] // 2  # 2 sent nothing


def test_a_new_node_cannot_take_over_a_live_topology_node(tmp_path, caplog):
    cfg = load_config(None, RING4)
    opts = RelayOptions(timeout=0.5, state_dir=str(tmp_path))
    by = {(r["round"], r["agent"]): r for r in relay(Restarting(2001, 1), cfg, opts, None)}
    assert by[3, 1]["global_acc"] is not None and by[3, 2]["global_acc"] is None
    assert "claims topology node 1, which is not absent; ignored" in caplog.text


def test_pulls_until_gives_up_on_a_missing_object_at_the_deadline():
    """A reply whose sender died mid-upload: its object never comes. Within
    :func:`pulls_until` the pull stops at the deadline (Flower's quick pulls alone wait for
    the 180 s object-push session); outside it the module's function is Flower's again."""
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, ObjectUnavailableError

    module = ModuleType("puller")
    module.pull_objects = inflatable_utils.pull_objects
    quick_pulls(module)
    quick = module.pull_objects
    tries = []

    def never(object_id: str) -> bytes:
        tries.append(object_id)
        raise ObjectUnavailableError(object_id)

    with pulls_until(module, time.monotonic()):  # the deadline has passed: one try only
        with pytest.raises(ObjectPullError):
            module.pull_objects(["a"], never)
        assert module.pull_objects(["b"], lambda i: b"whole") == {"b": b"whole"}
    assert tries == ["a"] and module.pull_objects is quick
    with pulls_until(module, None):
        assert module.pull_objects is quick


class HeldPull(LoopbackGrid):
    """At step 2 the relay's first pull blocks past the step deadline and returns nothing
    (a dead node's half-uploaded reply holds it), while the other replies arrive."""

    def __init__(self, hold: float):
        super().__init__(4)
        self.hold, self.step, self.held = hold, -1, False

    def push_messages(self, messages):
        step = step_of(messages[0])
        self.step = -1 if step is None else step
        return super().push_messages(messages)

    def pull_messages(self, message_ids):
        if self.step == 2 and not self.held:
            self.held = True
            time.sleep(self.hold)
            return []
        return super().pull_messages(message_ids)


def test_replies_in_by_the_deadline_count_after_a_pull_held_past_it(tmp_path):
    """The relay pulls once more after the deadline: a pull held past it (the CI failure:
    then no reply counted, and the run stopped with "no node replied") loses no reply."""
    cfg = load_config(None, RING4)
    opts = RelayOptions(timeout=0.3, state_dir=str(tmp_path))
    rows = relay(HeldPull(hold=0.6), cfg, opts, None)
    assert all(r["active"] and r["global_acc"] is not None for r in rows)


class ErrorReply(LoopbackGrid):
    """Topology node 1's step-2 reply is Flower's MESSAGE_UNAVAILABLE error reply, which
    names the ServerApp's own node (1), not node 1001."""

    def push_messages(self, messages):
        ids = super().push_messages(messages)
        for m in messages:
            if m.metadata.dst_node_id == 1001 and step_of(m) == 2:
                self.replies = [r for r in self.replies if r.metadata.reply_to_message_id
                                != m.metadata.message_id]  # fmt: skip
                error = Message(Error(3, "Reply message objects are unavailable."), reply_to=m)
                error.metadata.__dict__["_src_node_id"] = 1
                self.replies.append(error)
        return ids


def test_an_error_reply_is_the_node_it_answers(tmp_path, caplog):
    cfg = load_config(None, RING4)
    opts = RelayOptions(timeout=0.5, state_dir=str(tmp_path))
    by = {(r["round"], r["agent"]): r for r in relay(ErrorReply(4), cfg, opts, None)}
    assert "step 2: node 1 failed: Reply message objects are unavailable" in caplog.text
    assert by[2, 1]["global_acc"] is None and not by[3, 1]["active"]
    assert by[3, 1]["global_acc"] is not None and by[2, 0]["global_acc"] is not None


def test_kept_replies_confirm_after_the_next_push(monkeypatch):
    """On an ``HttpGrid`` the relay's reply confirmations wait for :meth:`release` (the
    payloads stay on the SuperLink for the next step's messages); other grids confirm as
    ``pull_messages`` does."""
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.superlink.grid.http_grid import HttpGrid

    from fedmerge.runtimes.flower.keep import KeptReplies

    sent = []
    monkeypatch.setattr(RuntimeHttpClient, "ConfirmMessageReceived",
                        lambda self, req: sent.append(req))  # fmt: skip
    grid = HttpGrid("127.0.0.1:9", insecure=True, token="t")  # no request is made

    def pull_messages(ids):  # Flower's pulls each reply, then confirms it
        for i in ids:
            grid._runtime_client.ConfirmMessageReceived(f"confirm {i}")
        return [f"reply {i}" for i in ids]

    monkeypatch.setattr(grid, "pull_messages", pull_messages)
    kept = KeptReplies(grid)
    assert kept.pull(["a", "b"]) == ["reply a", "reply b"] and sent == []
    assert kept.held == ["confirm a", "confirm b"]
    grid._runtime_client.ConfirmMessageReceived("direct")  # outside a pull: not held
    kept.release()
    assert sorted(sent) == ["confirm a", "confirm b", "direct"] and kept.held == []
    other = KeptReplies(LoopbackGrid(2))
    assert other.client is None and other.pull([]) == []
