"""Data-loader processes: TAO's default of 8 is capped at the cores a process may use; a number
set on purpose is kept."""
import logging

import pytest
import torch

from tests.conftest import quick_overrides
from training.config.load import build_spec
from training.data import workers
from training.data.workers import loader_workers


@pytest.fixture
def cores(monkeypatch):
    def set_cores(n: int, quota: bool = False) -> None:
        monkeypatch.setattr(workers, "usable_cores", lambda: (n, quota))
        workers._say_capped.cache_clear()

    return set_cores


def _default_workers_spec(synthetic_root, tmp_path, **extra):
    """The quick spec with dataset.num_workers left at its default (8)."""
    overrides = [o for o in quick_overrides(synthetic_root, tmp_path, **extra) if not o.startswith("dataset.num_workers=")]
    return build_spec({}, overrides)


def test_the_default_is_capped_at_the_usable_cores_shared_among_processes(synthetic_root, tmp_path, cores, caplog):
    spec = _default_workers_spec(synthetic_root, tmp_path)
    assert spec.dataset.num_workers == 8
    cores(2, quota=True)
    with caplog.at_level(logging.INFO, logger="training.data.workers"):
        assert loader_workers(spec) == 2
        assert loader_workers(spec) == 2
    assert caplog.text.count("2 data-loader process(es), not the default dataset.num_workers=8: this process may "
                             "use 2 core(s) (a CPU quota); set dataset.num_workers to choose") == 1  # once, not per loader
    assert loader_workers(spec, world_size=4) == 1  # never 0: that would load in the main process
    cores(64)
    assert loader_workers(spec) == 8 and loader_workers(spec, world_size=4) == 8


def test_a_number_set_on_purpose_is_kept(synthetic_root, tmp_path, cores):
    cores(2)
    for n in (0, 8, 12):
        assert loader_workers(build_spec({}, quick_overrides(synthetic_root, tmp_path, **{"dataset.num_workers": n}))) == n
    assert loader_workers(build_spec({"dataset": {"num_workers": 8}}, [])) == 8  # in the spec file too


def test_training_and_validation_loaders_use_it(synthetic_root, tmp_path, cores, monkeypatch):
    """torch warned at each of a 2-core machine's loaders that 8 workers exceed what it suggests."""
    from training import embed
    from training.engine import Trainer

    cores(1)
    spec = _default_workers_spec(synthetic_root, tmp_path, **{"train.num_epochs": 1, "train.validation_interval": 1})
    trainer = Trainer(spec, torch.device("cpu"))
    assert trainer.loader.num_workers == 1
    seen = []
    original = embed.torch.utils.data.DataLoader

    def recording(*args, **kwargs):
        seen.append(kwargs["num_workers"])
        return original(*args, **kwargs)

    monkeypatch.setattr(embed.torch.utils.data, "DataLoader", recording)
    trainer.fit()  # validation at the last epoch embeds the query and gallery sets
    assert seen == [1, 1]


def test_evaluation_and_inference_of_a_checkpoint_use_it(synthetic_root, tmp_path, cores, tiny_checkpoint):
    from training.embedders import open_embedder

    cores(1)
    embedder = open_embedder(str(tiny_checkpoint), _default_workers_spec(synthetic_root, tmp_path), torch.device("cpu"), 16)
    assert embedder.num_workers == 1
