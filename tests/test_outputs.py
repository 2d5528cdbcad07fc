"""Output files: a write that fails replaces nothing, and its error names the file."""
import errno
import resource
import signal
import subprocess
import sys

import pytest

from training.outputs import replaced_on_success


def test_a_failed_write_keeps_the_old_file_and_names_the_new_one(tmp_path):
    out = tmp_path / "embeddings.npz"
    out.write_bytes(b"previous")
    with pytest.raises(OSError) as err, replaced_on_success(out) as tmp:
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")  # as a full disk reports it: no file name
    assert str(err.value) == f"[Errno 28] No space left on device: '{out}'"
    assert out.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["embeddings.npz"]
    with pytest.raises(OSError) as err, replaced_on_success(out):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/elsewhere")
    assert err.value.filename == "/elsewhere"  # a file it names stays named


def test_export_onto_a_full_disk_is_one_line_naming_the_file(tiny_checkpoint, tmp_path):
    """A real short write: the file-size limit stands in for a full disk (both fail the write)."""
    onnx = tmp_path / "m.onnx"

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from the write instead of a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))

    run = subprocess.run([sys.executable, "-m", "export.cli", "--checkpoint", str(tiny_checkpoint), "--onnx", str(onnx)],
                         capture_output=True, text=True, preexec_fn=small_files, timeout=300)
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1] == f"reid-export: error: {onnx}: File too large"
    assert list(tmp_path.iterdir()) == []
