"""The library's two halves: training code imports nothing from preparation, h5py or snakemake."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "nsdzarr"
TRAINING = sorted((PKG / "training").glob("*.py"))
FORBIDDEN = ("nsdzarr.prepare", "h5py", "snakemake", "nibabel")


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name imported anywhere in ``path`` (also inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_training_modules_import_no_preparation_code():
    assert len(TRAINING) >= 7, TRAINING
    offenders = {
        f"{path.name}: {name}"
        for path in TRAINING
        for name in imported_modules(path)
        if name.startswith(FORBIDDEN) or name in ("nsdzarr.cli",)
    }
    assert not offenders, sorted(offenders)


def test_training_half_imports_without_h5py_or_snakemake():
    """Every training module imports with h5py, snakemake and the preparation half blocked."""
    modules = ["nsdzarr.training", "nsdzarr.loader"] + [
        f"nsdzarr.training.{p.stem}" for p in TRAINING if p.stem != "__init__"
    ]
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        top = name.split('.')[0]
        if top in ('h5py', 'snakemake', 'nibabel') or name.startswith('nsdzarr.prepare'):
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import importlib
for m in {modules!r}:
    importlib.import_module(m)
from nsdzarr.training import BetasDataset, ImageReader, RoiReader, TrialBatchSampler
print('ok', len({modules!r}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")


def test_numpy_readers_import_without_torch():
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'torch':
            raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
from nsdzarr.training import ImageReader, RoiReader
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_old_loader_path_still_works():
    from nsdzarr.loader import BetasDataset, TrialBatchSampler
    from nsdzarr.training import BetasDataset as New
    from nsdzarr.training import TrialBatchSampler as NewSampler

    assert BetasDataset is New and TrialBatchSampler is NewSampler
