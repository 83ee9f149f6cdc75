"""The main window's menus and keyboard shortcuts."""
from __future__ import annotations

from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QMessageBox

HELP_TEXT = (
    "1. Drop a training file (chat JSONL, prompt/completion JSONL, or CSV).\n"
    "2. Check the report: fix errors (click one to see the line).\n"
    "3. Press Run. Every step the model reads a batch (forward), measures how wrong it was "
    "(loss), works out which way each weight should move (backpropagation) and moves them "
    "a little (update).\n"
    "4. Watch the loss fall and the weights change, then chat with the tuned model. \"Did it learn?\" asks "
    "the tuned and the base model your questions side by side.\n"
    "5. Step runs exactly one step and shows what each phase computed; double-click an example in the data "
    "table to see the loss of each of its tokens.\n\n"
    "The model starts from pre-trained weights, not random ones: fine-tuning only nudges them.")


def build_menus(win) -> None:
    """The window's menus and shortcuts; sets win.open_action, run_action, pause_action, stop_action."""
    mb = win.menuBar()
    fm = mb.addMenu("&File")
    win.open_action = _action(win, "&Open training file…", win.browse_data_file, QKeySequence.StandardKey.Open)
    fm.addAction(win.open_action)
    fm.addAction(_action(win, "Open &validation file…", win.browse_validation_file))
    fm.addAction(_action(win, "Choose base model &folder…", win.choose_base_folder))
    fm.addSeparator()
    win.export_action = _action(win, "&Export…", lambda: win.export_dialog(None), "Ctrl+E")
    win.export_action.setToolTip("GGUF (f32 / f16 / q8_0) with an Ollama Modelfile, a Hugging Face folder, or the "
                                 "PEFT adapter")
    fm.addAction(win.export_action)
    fm.addAction(_action(win, "Export loss chart as &PNG…", win.loss_panel.export_png_dialog))
    fm.addAction(_action(win, "Export loss chart as &CSV…", win.loss_panel.export_csv_dialog))
    fm.addSeparator()
    fm.addAction(_action(win, "&Quit", win.close, QKeySequence.StandardKey.Quit))
    rm = mb.addMenu("R&uns")
    win.import_action = _action(win, "&Import…", win.import_dialog)
    rm.addAction(win.import_action)
    rm.addAction(_action(win, "Run &history", lambda: win.left_tabs.setCurrentIndex(1)))
    tm = mb.addMenu("&Training")
    win.run_action = _action(win, "&Run", win.start_training, "Ctrl+R")
    win.pause_action = _action(win, "&Pause / Resume", win.toggle_pause, "Ctrl+P")
    win.stop_action = _action(win, "&Stop", win.stop_training, "Ctrl+.")
    win.step_action = _action(win, "Run one &step", win.step, "Ctrl+T")
    for a in (win.run_action, win.step_action, win.pause_action, win.stop_action):
        tm.addAction(a)
    vm = mb.addMenu("&View")
    vm.addAction(_action(win, "Run &history", lambda: win.left_tabs.setCurrentIndex(1), "Ctrl+H"))
    vm.addAction(_action(win, "&Data and settings", lambda: win.left_tabs.setCurrentIndex(0), "Ctrl+D"))
    vm.addAction(_action(win, "&Compare with base", win.chat.compare_box.toggle, "Ctrl+K"))
    vm.addAction(_action(win, "&Rescale weights colours", win.weights_view.rescale))
    vm.addAction(_action(win, "&Focus chat", win.chat.input.setFocus, "Ctrl+L"))
    hm = mb.addMenu("&Help")
    hm.addAction(_action(win, "&How it works", lambda: QMessageBox.information(win, "How it works", HELP_TEXT),
                         QKeySequence.StandardKey.HelpContents))


def _action(parent, text, slot, shortcut=None) -> QAction:
    a = QAction(text, parent)
    if shortcut is not None:
        a.setShortcut(QKeySequence(shortcut))
    a.triggered.connect(lambda _=False: slot())
    return a
