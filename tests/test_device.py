"""``device``: resolution (GPUs faked by monkeypatching ``torch.cuda``), clear errors, rows
that do not change on the CPU, and the device boundary of the round kit.

No GPU is here, so the boundary is checked with the ``meta`` device, which torch allows on
any build: tensors there have shapes and no data. An agent built on it must hold every
tensor there; a payload must leave it through a copy to the CPU (which a meta tensor
refuses: the error proves the copy is made); a received payload must arrive on it. The
CUDA runs themselves are in ``tests/test_gpu.py``, skipped without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from fedmerge.alignment.activation import CrossStats
from fedmerge.alignment.spec import identity_perms, permutation_spec
from fedmerge.config import load_config
from fedmerge.decentralized import setup as setup_py
from fedmerge.decentralized.agent import Agent
from fedmerge.decentralized.payload import Payload
from fedmerge.decentralized.setup import build_setup
from fedmerge.device import CPU, resolve_device, to_device
from fedmerge.errors import ConfigError
from fedmerge.runtimes import torchdist
from fedmerge.runtimes.local.simulator import Simulator

META = torch.device("meta")
RING4 = ["topology=ring-4", "rounds=2"]


def gpus(monkeypatch, count: int, local_rank: str | None = None) -> None:
    """Pretend this host has ``count`` CUDA devices (and a torchrun LOCAL_RANK)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)


def cuda(i: int) -> torch.device:
    return torch.device("cuda", i)


def test_resolution_without_a_gpu(monkeypatch):
    gpus(monkeypatch, 0)
    assert resolve_device("cpu") == CPU and resolve_device("auto") == CPU
    for name in ("cuda", "cuda:0", "cuda:1"):
        with pytest.raises(ConfigError, match=f"device: '{name}' asks for CUDA.*no GPU"):
            resolve_device(name)


def test_resolution_with_gpus_and_local_rank(monkeypatch):
    gpus(monkeypatch, 2)
    assert resolve_device("auto") == resolve_device("cuda") == cuda(0)
    assert resolve_device("cpu") == CPU  # never a GPU unless asked
    assert resolve_device("cuda:1") == cuda(1)
    with pytest.raises(ConfigError, match="device: 'cuda:2', but this host has 2 GPU"):
        resolve_device("cuda:2")
    gpus(monkeypatch, 2, local_rank="1")  # torchrun: the rank's own GPU
    assert resolve_device("auto") == resolve_device("cuda") == cuda(1)
    assert resolve_device("cuda:0") == cuda(0)  # an explicit index wins
    assert resolve_device("auto", env={"LOCAL_RANK": "3"}) == cuda(1)  # 4 ranks, 2 GPUs


def test_bad_names_are_config_errors_naming_the_field(monkeypatch):
    for bad in ("gpu", "cuda:", "cuda:-1", "CUDA", "mps", ""):
        with pytest.raises(ConfigError, match=r"^device: must be auto, cpu, cuda or cuda:N"):
            load_config(None, [f"device={bad!r}"])
    with pytest.raises(ConfigError, match="^device:"):
        resolve_device("tpu")
    gpus(monkeypatch, 0)
    cfg = load_config(None, [*RING4, "device=cuda"])  # valid syntax: checked where it runs
    with pytest.raises(ConfigError, match="device: 'cuda' asks for CUDA"):
        build_setup(cfg)
    assert load_config(None).device == "cpu"


def rows_without_wall(cfg) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in Simulator(cfg).run()]


@pytest.mark.parametrize(
    "sets",
    [
        ["protocol.name=gossip"],  # stacked engine
        ["protocol.name=gossip", "protocol.codec=topk", "protocol.consensus_step=0.5"],
        ["protocol.name=dimat", "model.init=different"],
    ],
    ids=["gossip-stacked", "choco", "dimat"],
)
def test_cpu_and_auto_give_the_same_rows_here(monkeypatch, sets):
    """Without a GPU ``auto`` is the CPU: bit for bit the rows of ``device: cpu``."""
    gpus(monkeypatch, 0)
    cpu = rows_without_wall(load_config(None, [*RING4, *sets, "device=cpu"]))
    auto = rows_without_wall(load_config(None, [*RING4, *sets, "device=auto"]))
    assert cpu == auto and len(cpu) == 8
    assert all(r["consensus"] is not None for r in cpu)


def test_auto_under_the_torchdist_launcher_without_a_gpu_is_the_cpu():
    """Each worker resolves ``auto`` itself (LOCAL_RANK set, gloo): the simulator's rows."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: tests/test_gpu.py covers auto with CUDA")
    sets = [*RING4, "device=auto", "vectorize=never", "distributed.agents_per_rank=2",
            "distributed.timeout_s=30"]  # fmt: skip
    cfg = load_config(None, sets)
    got = torchdist.run(cfg, procs=2, threads=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = Simulator(load_config(None, [*sets[:-3], "device=cpu"])).run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(got, want, strict=True):
        same = ("round", "agent", "bytes_sent", "bytes_received")
        assert [a[k] for k in same] == [b[k] for k in same]
        assert a["consensus"] == pytest.approx(b["consensus"], abs=1e-6)
        assert a["global_acc"] == pytest.approx(b["global_acc"], abs=1e-6)


def on_meta(monkeypatch, sets: list[str]):
    """A setup whose device is ``meta`` (as a GPU would be: everything else on the CPU)."""
    monkeypatch.setattr(setup_py, "resolve_device", lambda name: META)
    return build_setup(load_config(None, [*RING4, *sets]))


def tensors_of(agent: Agent) -> dict[str, torch.Tensor]:
    out = {f"state.{k}": v for k, v in agent.state().items()}
    out |= {f"param.{k}": p for k, p in agent.model.named_parameters()}
    out |= {f"ref.{k}": v for k, v in (agent.reference or {}).items()}
    data = agent.data
    out |= {"train_x": data.train_x, "train_y": data.train_y, "test_x": data.test_x,
            "test_y": data.test_y}  # fmt: skip
    return out


@pytest.mark.parametrize(
    "sets", [["protocol.codec=topk"], ["protocol.name=dimat", "model.name=cnn"]],
    ids=["choco", "dimat-cnn"],
)  # fmt: skip
def test_every_agent_tensor_is_on_the_resolved_device(monkeypatch, sets):
    setup = on_meta(monkeypatch, sets)
    assert setup.device == META
    assert setup.data.test_x.device == META and setup.data.agents[1].train_x.device == META
    agent = setup.agent(1)
    assert agent.device == META
    off = {k: v.device for k, v in tensors_of(agent).items() if v.device != META}
    assert not off and len(tensors_of(agent)) > 8
    if agent.choco is not None:
        assert agent.choco.device == META
    if setup.reference is not None:  # one shared copy on the device, not one per agent
        assert next(iter(agent.reference.values())) is next(iter(setup.reference.values()))


def test_training_on_the_device_keeps_it_there_and_publishing_leaves_it(monkeypatch):
    agent = on_meta(monkeypatch, []).agent(0)
    assert agent.train() == 2  # forward, backward and SGD steps on the device
    assert {v.device for v in tensors_of(agent).values()} == {META}
    with pytest.raises(NotImplementedError, match="meta"):  # the copy to the CPU is made
        agent.publish(0)


def test_payloads_leave_on_the_cpu_as_owned_copies():
    w = torch.arange(6.0, requires_grad=True).reshape(2, 3)
    p = Payload.make({"w": w.t()}, sender=1, round=0, samples=1, kind="delta")
    got = p.tensors["w"]
    assert got.device == CPU and got.is_contiguous() and not got.requires_grad
    assert got.data_ptr() != w.data_ptr() and got.tolist() == w.t().tolist()


def test_received_payloads_arrive_on_the_agent_device(monkeypatch):
    agent = on_meta(monkeypatch, []).agent(0)
    sent = Payload.make({"w": torch.ones(2)}, sender=1, round=0, samples=1, kind="delta")
    arrived = agent.arrive(sent)
    assert arrived.tensors["w"].device == META and sent.tensors["w"].device == CPU
    assert (arrived.sender, arrived.hash) == (sent.sender, sent.hash)
    agent.device = CPU  # already there: the payload itself, nothing copied
    assert agent.arrive(sent) is sent


def test_choco_restores_copies_on_its_device_and_codec_state_on_the_cpu(monkeypatch):
    agent = on_meta(monkeypatch, ["protocol.codec=topk"]).agent(0)
    saved = {"__choco__/copy/3/w": torch.ones(2), "__choco__/codec/residual/w": torch.ones(2)}
    agent.choco.load_tensors(saved, {"choco_calls": "4"})
    assert agent.choco.copies[3]["w"].device == META
    assert agent.choco.encoder.state["w"]["residual"].device == CPU
    assert agent.choco.encoder.calls == 4


def test_alignment_statistics_follow_the_device(monkeypatch):
    agent = on_meta(monkeypatch, ["protocol.name=dimat", "model.name=cnn"]).agent(0)
    perms = identity_perms(permutation_spec(agent.model), agent.state())
    assert perms and {p.device for p in perms.values()} == {META}
    stats = CrossStats(4, META)
    assert {t.device for t in (stats.sum_a, stats.sq_b, stats.cross)} == {META}


def test_the_stacked_engine_stays_on_the_cpu(monkeypatch):
    setup = on_meta(monkeypatch, ["vectorize=always"])
    with pytest.raises(ConfigError, match="vectorize: 'always' is impossible here: device 'meta'"):
        Simulator(setup.config, setup)


def test_to_device_moves_only_what_is_elsewhere():
    x = {"a": torch.ones(2), "b": torch.zeros(3)}
    same = to_device(x, CPU)
    assert all(same[k] is x[k] for k in x)
    copied = to_device(x, "cpu", copy=True)
    assert all(copied[k].data_ptr() != x[k].data_ptr() for k in x)
    assert {v.device for v in to_device(x, META).values()} == {META}
