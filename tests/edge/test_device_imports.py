"""edge/ is what runs on the device: it must import and run without the compiler's extras."""

import subprocess
import sys

HOST_ONLY = ("onnx", "onnxruntime", "onnxscript", "torch", "transformers")
BLOCK_TEMPLATE = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ModuleNotFoundError('blocked on the device: ' + name, name=name.split('.')[0])
sys.meta_path.insert(0, Block())
"""
BLOCK = BLOCK_TEMPLATE.format(blocked=HOST_ONLY + ("deploy",))  # edge/ must not reach into deploy/ either


def test_edge_imports_without_host_packages():
    code = BLOCK + """
import pkgutil, importlib, edge
names = [m.name for m in pkgutil.walk_packages(edge.__path__, 'edge.') if not m.name.endswith('__main__')]
for n in names:
    importlib.import_module(n)
print(len(names))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) >= 10


def test_runtime_with_jit_runs_without_host_packages(tiny_artifact, tmp_path):
    code = BLOCK + f"""
import numpy as np, edge
rt = edge.Runtime({str(tiny_artifact)!r}, jit={{"min_hits": 1, "buckets": "exact"}}, cache_dir={str(tmp_path / 'c')!r}, state_dir={str(tmp_path / 's')!r})
x = {{"input_ids": np.ones((1, 9), dtype=np.int64), "attention_mask": np.ones((1, 9), dtype=np.int64)}}
rt.run(x); rt.specializer.wait_idle(300)
print(rt.specializer.ready_lengths(), rt.run(x)[1].shape)
rt.close()
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "[9] (1, 32)" in r.stdout


def test_cli_device_commands_without_host_packages(tiny_artifact):
    code = BLOCK + f"""
import sys
from edge.cli import main
sys.exit(main(["run", {str(tiny_artifact)!r}, "--input", "input_ids=[[1,2,3]]"]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "pooled: shape [1, 32]" in r.stdout
    code = BLOCK_TEMPLATE.format(blocked=HOST_ONLY) + """
import sys
from edge.cli import main
sys.exit(main(["compile", "m.onnx", "-o", "x"]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "runs on the build host" in r.stderr


def test_device_commands_leave_tvm_to_load_tvm():
    """Importing edge and the device commands' modules does not import TVM: each command chooses
    the library first (edge.load_tvm: the runtime alone unless it compiles in-process)."""
    code = BLOCK + """
import sys
import edge, edge.generate, edge.cli, edge.cli.generate, edge.cli.chat, edge.cli.run, edge.cli.daemon
import edge.serve.config, edge.jit.policy
print(sorted(m for m in ("tvm", "tvm_ffi", "torch") if m in sys.modules))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
