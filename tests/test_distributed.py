"""tngraph.distributed on two gloo processes: each piece of per-target work is done by one rank,
every rank ends with all results, and an error on its owner is raised on every rank."""
import pytest
import torch.multiprocessing as mp


def _worker(rank, init, results):
    import torch
    import torch.distributed as dist

    from tngraph import distributed

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        group = distributed.current()
        calls = []

        def work(key):
            calls.append(key)
            return torch.full((2,), float(key)) * (rank + 1)  # which rank computed it shows in the value

        shared = distributed.share_map(group, [10, 11, 12, 13, 14], work)
        try:
            distributed.share_map(group, ["ok", "bad"], lambda k: 1 / 0 if k == "bad" else k)
            failed = None
        except ZeroDivisionError as exc:
            failed = type(exc).__name__
        results[rank] = (calls, {k: v.tolist() for k, v in shared.items()}, failed)
    finally:
        dist.destroy_process_group()


def test_share_map_splits_the_work_and_shares_every_result(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(init, results), nprocs=2, join=True)
        results = dict(results)
    (calls0, shared0, failed0), (calls1, shared1, failed1) = results[0], results[1]
    assert calls0 == [10, 12, 14] and calls1 == [11, 13]  # target j on rank j % 2
    expected = {10: [10.0, 10.0], 11: [22.0, 22.0], 12: [12.0, 12.0], 13: [26.0, 26.0], 14: [14.0, 14.0]}
    assert shared0 == shared1 == expected
    assert failed0 == failed1 == "ZeroDivisionError"  # raised on rank 1, where "bad" ran, and on rank 0


def test_one_process_is_a_plain_map():
    from tngraph import distributed

    assert distributed.share_map(None, [1, 2], lambda k: k * 3) == {1: 3, 2: 6}
    with pytest.raises(KeyError):
        distributed.share_map(distributed.current(), ["x"], lambda k: {}[k])


def _compress_worker(rank, init, results, budget):
    import importlib

    import torch
    import torch.distributed as dist

    import tngraph
    from tests.conftest import MLP
    factorize = importlib.import_module("tngraph.passes.factorize")  # the module (tngraph.passes.factorize is also the pass)

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    calls = []
    real = factorize.decompose_lowrank
    factorize.decompose_lowrank = lambda *a, **k: calls.append(1) or real(*a, **k)  # decompositions this rank made
    through = factorize.lowrank_from_outputs  # (a narrowing target's, from its output Gram)
    factorize.lowrank_from_outputs = lambda *a, **k: calls.append(1) or through(*a, **k)
    try:
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(1)
        mix = torch.randn(24, 24, generator=g)
        batches = [((torch.randn(16, 24, generator=g) @ mix,), {}) for _ in range(8)]
        result = tngraph.compress_with_result(MLP(), calibration=batches, budget=budget, heal_steps=0, progress=False,
                                              sensitivity="measured")
        results[rank] = ({n: {k: v.clone() for k, v in p.factors.items()} for n, p in result.context.plan.items()},
                         result.context.group.world, len(calls))
    finally:
        dist.destroy_process_group()


def test_the_whole_graph_driver_shares_its_per_target_work_too(tmp_path):
    """compress() under torch.distributed: the passes' group is the process group, and every rank
    ends with the factors a one-process run makes (the same thread count), bit for bit."""
    import torch

    import tngraph
    from tests.conftest import MLP

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_compress_worker, args=(f"file://{tmp_path / 'rendezvous'}", results, 0.5), nprocs=2, join=True)
        results = dict(results)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(24, 24, generator=g)
    batches = [((torch.randn(16, 24, generator=g) @ mix,), {}) for _ in range(8)]
    one = tngraph.compress_with_result(MLP(), calibration=batches, budget=0.5, heal_steps=0, progress=False, sensitivity="measured")
    (plans0, world0, made0), (plans1, world1, made1) = results[0], results[1]
    assert world0 == world1 == 2 and one.context.group is None
    assert made0 == 2 and made1 == 1  # the three targets' decompositions: j on rank j % 2
    assert set(plans0) == set(plans1) == set(one.context.plan) and plans0
    for name, plan in one.context.plan.items():
        for key, tensor in plan.factors.items():
            assert torch.equal(plans0[name][key], tensor) and torch.equal(plans1[name][key], tensor), (name, key)


def _workflow_worker(rank, port, folder, out, calibration, results):
    import os

    import torch

    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist

    from tngraph import workflow

    try:
        run = workflow.compress(folder, out, calibration=calibration, budget=0.5, heal_steps=2, batch_size=8, evaluate=False, baseline=False,
                                threads=1, progress=False, sensitivity="fisher")
        factors = {n: {k: v.clone() for k, v in p.factors.items()} for n, p in run.result.context.plan.items()}
        results[rank] = (run.rank, run.result.heal is not None, sorted(run.report), factors, os.path.isdir(out))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(2)


def test_under_torchrun_rank_0_alone_heals_scores_and_writes(tmp_path, minilm):
    """The whole-graph workflow on two processes: both share the passes (the same factors), rank 0
    then heals and writes the artifact, rank 1 stops after the passes instead of healing again."""
    import socket

    from tests.conftest import write_tiny_bert

    folder = str(write_tiny_bert(tmp_path / "bert", minilm[1]))
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("\n".join(f"line {i} of a text that is not the built-in one, about tensor {i % 7}." for i in range(48)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "out")
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_workflow_worker, args=(port, folder, out, str(calibration), results), nprocs=2, join=True)
        results = dict(results)
    (rank0, healed0, report0, factors0, _), (rank1, healed1, report1, factors1, _) = results[0], results[1]
    assert (rank0, rank1) == (0, 1) and healed0 and not healed1
    assert "written_by" in report1 and "latency" not in report1 and "timings" in report0
    assert factors0.keys() == factors1.keys() and factors0
    import torch

    import tngraph

    loaded = tngraph.load(out)  # rank 0's artifact, healed
    assert loaded.tngraph_recipe["config"]["heal_steps"] == 2
    for name, keys in factors1.items():  # the passes' factors are the same on both ranks (before healing)
        for key, tensor in keys.items():
            assert torch.equal(factors0[name][key], tensor), (name, key)
