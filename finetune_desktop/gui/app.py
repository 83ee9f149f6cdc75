"""`finetune-desktop` / `finetune-desktop gui [DATA]`: start the app."""
from __future__ import annotations

import sys


def make_application(argv=None):
    """The QApplication with the app's font (CJK fallbacks so Korean renders) and names."""
    from PySide6.QtWidgets import QApplication

    from ..engine.runtime import configure_process
    from . import style
    from .paths import APP, ORG

    configure_process()  # once, on the GUI thread, before any worker starts
    app = QApplication.instance()
    if app is None:
        app = QApplication(list(argv if argv is not None else sys.argv[:1]))
    app.setOrganizationName(ORG)
    app.setApplicationName(APP)
    app.setFont(style.app_font())
    return app


def run_app(data_path_or_None=None) -> int:
    """Open the main window (embedded base model), optionally with a training file loaded.
    Returns the exit code. Errors inside the app are shown in the window, never as a traceback."""
    app = make_application()
    from .main_window import MainWindow

    win = MainWindow()

    def hook(exc_type, exc, tb):  # a bug in a slot: log it, tell the user, keep running
        if issubclass(exc_type, KeyboardInterrupt):
            app.quit()
            return
        import traceback
        try:
            from .paths import app_home
            p = app_home() / "logs"
            p.mkdir(parents=True, exist_ok=True)
            with open(p / "gui-errors.log", "a", encoding="utf-8") as f:
                f.write("".join(traceback.format_exception(exc_type, exc, tb)) + "\n")
        except Exception:  # noqa: BLE001
            pass
        try:
            win.show_error(f"Something went wrong ({exc_type.__name__}: {exc}). The app keeps running; "
                           "details are in the log folder.")
        except Exception:  # noqa: BLE001
            pass

    sys.excepthook = hook
    win.show()
    if data_path_or_None:
        win.load_data_file(str(data_path_or_None))
    return int(app.exec())
