"""Files under faults: a process killed (SIGKILL) while it writes an artifact leaves nothing that
loads, and a kill while replacing one (--force) never leaves a half-new artifact."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import tngraph
from tngraph.errors import ArtifactError

# compresses the tests' MLP and saves it; KILL_AT names the write during which it SIGKILLs itself
SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    sys.path.insert(0, {root!r})
    import tngraph, tngraph.artifact as artifact, tngraph.ownership as ownership
    from tests.conftest import MLP
    g = torch.Generator().manual_seed(1)
    data = [((torch.randn(16, 24, generator=g),), {{}}) for _ in range(4)]
    module = tngraph.compress(MLP().eval(), calibration=data, config=tngraph.Config(budget={budget}, progress=False, heal_steps=0))
    kill_at = os.environ.get("KILL_AT")
    real_save_file, real_exchange = artifact.save_file, ownership._exchange
    def save_file(tensors, path, metadata=None):
        if kill_at == "factors":  # half of the factors on disk, then the process dies
            real_save_file(tensors, path, metadata=metadata)
            size = os.path.getsize(path)
            with open(path, "r+b") as f:
                f.truncate(size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        real_save_file(tensors, path, metadata=metadata)
    def exchange(a, b):
        swapped = real_exchange(a, b)
        if kill_at == "swap":  # right after the new folder took the old one's place
            os.kill(os.getpid(), signal.SIGKILL)
        return swapped
    artifact.save_file, ownership._exchange = save_file, exchange
    tngraph.save(module, sys.argv[1], force=True)
""")


def _run(tmp_path, out, kill_at, budget=0.5):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = tmp_path / "save.py"
    script.write_text(SCRIPT.format(root=root, budget=budget))
    env = {**os.environ, "KILL_AT": kill_at or ""}
    return subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True, timeout=300)


def _model():
    from tests.conftest import MLP

    return MLP().eval()


def test_sigkill_while_writing_leaves_no_loadable_artifact(tmp_path):
    out = tmp_path / "art"
    done = _run(tmp_path, out, "factors")
    assert done.returncode == -signal.SIGKILL
    assert not out.exists()
    with pytest.raises(ArtifactError, match="no artifact"):
        tngraph.load(out, model=_model())
    # what the dead process left is a hidden staging folder, never taken for the artifact
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".art.tmp-")]
    assert leftovers and all(p.startswith(".") for p in leftovers)


def test_sigkill_while_replacing_keeps_the_old_artifact_or_the_whole_new_one(tmp_path):
    out = tmp_path / "art"
    first = _run(tmp_path, out, None, budget=0.5)
    assert first.returncode == 0, first.stderr[-2000:]
    before = tngraph.load(out, model=_model())
    killed = _run(tmp_path, out, "factors", budget=0.3)  # dies before any rename: the old one stays
    assert killed.returncode == -signal.SIGKILL
    half = _staging(tmp_path)
    assert len(half) == 1  # the half-written new folder
    x = torch.randn(5, 24)
    torch.testing.assert_close(tngraph.load(out, model=_model())(x), before(x), atol=0, rtol=0)
    renamed = _run(tmp_path, out, "swap", budget=0.3)  # dies right after the new folder is in place
    assert renamed.returncode == -signal.SIGKILL
    after = tngraph.load(out, model=_model())  # complete and verified (hashes): the new one
    assert sum(p.numel() for p in after.parameters()) < sum(p.numel() for p in before.parameters())
    # each run removes what a killed one left: now only the swapped-out old folder of the last one is there
    old = _staging(tmp_path)
    assert len(old) == 1 and old != half
    (tmp_path / ".art.tmp-users").mkdir()  # not tngraph's (no marker): left alone
    again = _run(tmp_path, out, None, budget=0.3)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _staging(tmp_path) == [".art.tmp-users"]


def _staging(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".art."))
