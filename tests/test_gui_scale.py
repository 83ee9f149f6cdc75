"""A 30-layer model (SmolLM2-135M's depth, narrow so the test stays small) in the real window:
one step in step mode, then the pickers and the layers × tensors pictures keep readable cells and
labels at 1280x800, and the overview is measured only while it is shown."""
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytestqt")
from PySide6.QtCore import Qt  # noqa: E402
from PySide6.QtGui import QFontMetrics  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tinymodel import make_tiny_model_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "sample_data" / "pirate_prompt_completion.jsonl"
LAYERS = 30


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory):
    return make_tiny_model_folder(tmp_path_factory.mktemp("deep") / "model", hidden=32, layers=LAYERS, heads=4,
                                  kv_heads=2, intermediate=64)


def test_thirty_layers_stay_readable_and_the_overview_is_measured_only_when_shown(qtbot, deep_model):
    from finetune_desktop.gui import MainWindow
    from finetune_desktop.gui.tensor_grid import MIN_ROW_PX
    w = MainWindow(base_model=deep_model)
    w.confirm_close = False
    qtbot.addWidget(w)
    w.resize(1280, 800)
    w.show()
    w.load_data_file(str(DATA))
    qtbot.waitUntil(lambda: w.drop_zone.property("state") == "ok", timeout=60_000)
    w.data_panel.epochs.setValue(1)
    w.monitor.tabs.setCurrentWidget(w.weights_view)
    qtbot.mouseClick(w.step_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: w.training.waiting and w.step_view.picture is not None, timeout=120_000)
    # the weights view's pickers list every layer; the combo shows many rows at once
    qtbot.waitUntil(lambda: w.weights_view.layer_box.count() == LAYERS, timeout=10_000)
    assert w.weights_view.layer_box.maxVisibleItems() >= 16
    # not measured while the overview is hidden ...
    assert w.overview.changes is None and not w.training.want_changes
    # ... measured (as a reader of the paused run) once it is shown
    w.monitor.tabs.setCurrentWidget(w.overview)
    qtbot.waitUntil(lambda: w.overview.changes is not None, timeout=20_000)
    qtbot.waitUntil(lambda: w.overview.grid.grid.shape == (LAYERS, 7), timeout=10_000)
    assert w.training.want_changes
    assert len(w.overview.changes.changes) == LAYERS * 7 and all(v > 0 for v in w.overview.changes.changes.values())
    # cells and labels stay readable at 1280x800
    vb = w.overview.grid.plot.vb
    row_px = vb.height() / LAYERS
    assert row_px >= MIN_ROW_PX, row_px
    ticks = w.overview.grid.plot.getAxis("left")._tickLevels[0]
    spacing_px = (ticks[1][0] - ticks[0][0]) * row_px
    assert spacing_px >= QFontMetrics(w.overview.grid.font()).height() * 0.8, spacing_px
    # the step's backprop and update pictures have one cell per layer and matrix
    assert w.step_view.grad_grid.grid.shape == (LAYERS, 7)
    assert np.isfinite(w.step_view.update_grid.grid).all()
    # clicking a cell opens that matrix in the weights view
    w.overview.matrixChosen.emit("layer 27", "down_proj")
    assert w.monitor.tabs.currentWidget() is w.weights_view
    assert w.weights_view.chosen_name() == "model.layers.27.mlp.down_proj.weight"
    # hidden again: the training thread stops measuring
    assert not w.training.want_changes
    assert w.shutdown(timeout_s=60)
    w.close()
