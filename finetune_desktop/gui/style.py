"""Fonts, colours and the small style sheet shared by the widgets."""
from __future__ import annotations

from PySide6.QtGui import QColor, QFont, QFontDatabase

# Latin first, then CJK fallbacks so Korean (and Japanese/Chinese) always renders.
FONT_FAMILIES = [
    "Noto Sans", "Inter", "Segoe UI", "Helvetica Neue", "DejaVu Sans",
    "Noto Sans CJK KR", "Noto Sans KR", "Apple SD Gothic Neo", "Malgun Gothic", "NanumGothic",
    "Noto Sans CJK JP", "Noto Sans CJK SC", "sans-serif",
]
MONO_FAMILIES = ["Noto Sans Mono", "DejaVu Sans Mono", "Menlo", "Consolas", "Noto Sans Mono CJK KR", "monospace"]

ROLE_COLOURS = {
    "system": QColor("#ece8f7"),
    "user": QColor("#e3effd"),
    "assistant": QColor("#e6f6ea"),
    "tool": QColor("#f6f0e0"),
}
ROLE_TEXT = {"system": "#5b4a93", "user": "#1f5fa8", "assistant": "#237a3b", "tool": "#7a5a1f"}

# Chart colours (colour-blind friendly where it matters).
TRAIN_RAW = (120, 150, 200, 90)
TRAIN_SMOOTH = (31, 95, 168)
VALID = (214, 96, 30)
ACCURACY = (35, 122, 59)
LR = (120, 80, 160)
GRADNORM = (150, 60, 60)
GENERAL = (120, 110, 20)    # general-ability loss (forgetting meter)
QUIZ = (200, 60, 140)       # quiz score
OVERLAY = [(90, 60, 200), (60, 160, 160), (160, 130, 30), (100, 100, 100), (40, 140, 90)]


def app_font(point_size: float | None = None) -> QFont:
    f = QFont()
    f.setFamilies(_available(FONT_FAMILIES))
    if point_size:
        f.setPointSizeF(point_size)
    return f


def mono_font(point_size: float | None = None) -> QFont:
    f = QFont()
    f.setFamilies(_available(MONO_FAMILIES) + _available(FONT_FAMILIES))
    f.setStyleHint(QFont.StyleHint.Monospace)
    if point_size:
        f.setPointSizeF(point_size)
    return f


def _available(names: list[str]) -> list[str]:
    """Installed families from `names`, in order (all of them when none is installed, so Qt's
    own fallback still applies)."""
    try:
        have = {f.lower() for f in QFontDatabase.families()}
    except Exception:  # noqa: BLE001 - no font database before a QGuiApplication
        return list(names)
    found = [n for n in names if n.lower() in have]
    return found or list(names)


def has_korean_font() -> bool:
    have = {f.lower() for f in QFontDatabase.families()}
    return any(n.lower() in have for n in ("Noto Sans CJK KR", "Noto Sans KR", "Apple SD Gothic Neo",
                                           "Malgun Gothic", "NanumGothic"))


STYLE_SHEET = """
QGroupBox { font-weight: 600; border: 1px solid #d4d8de; border-radius: 6px; margin-top: 10px; padding-top: 6px; }
QGroupBox::title { subcontrol-origin: margin; left: 8px; padding: 0 4px; color: #33475b; }
#dataDropZone { border: 2px dashed #8aa4c8; border-radius: 8px; background: #f5f8fc; }
#dataDropZone[dragActive="true"] { border-color: #1f5fa8; background: #e3effd; }
#dataDropZone[state="ok"] { border-style: solid; border-color: #5aa469; background: #f1faf3; }
#dataDropZone[state="bad"] { border-style: solid; border-color: #d0534a; background: #fdf3f2; }
#banner { background: #fff4ce; border: 1px solid #e5c06b; border-radius: 4px; padding: 6px; color: #5c4400; }
#errorBanner { background: #fde7e5; border: 1px solid #e0908a; border-radius: 4px; padding: 6px; color: #7a1f17; }
#runButton { font-weight: 600; padding: 6px 14px; }
#estimateLabel, #progressLabel { color: #44515f; }
"""


PIXMAP_CACHE_KB = 256 * 1024


def cache_axes(*plot_items) -> None:
    """Let Qt keep each axis as a pixmap and repaint it only when it changes. pyqtgraph replays
    the axis' recorded text drawing on every repaint of anything next to it (a few ms per axis),
    which is most of the GUI thread's time while charts update live.

    The pixmaps live in QPixmapCache (10 MB by default). An axis that draws grid lines covers its
    whole plot, so on a 4K screen one axis needs several MB and the cache evicted them all the
    time: every repaint replayed every axis again. The limit is raised to PIXMAP_CACHE_KB."""
    from PySide6.QtGui import QPixmapCache
    from PySide6.QtWidgets import QGraphicsItem
    if QPixmapCache.cacheLimit() < PIXMAP_CACHE_KB:
        QPixmapCache.setCacheLimit(PIXMAP_CACHE_KB)
    for pi in plot_items:
        axes = getattr(pi, "axes", None)
        items = [a["item"] for a in axes.values()] if isinstance(axes, dict) else []
        if hasattr(pi, "titleLabel"):
            items.append(pi.titleLabel)
        for it in items:
            it.setCacheMode(QGraphicsItem.CacheMode.DeviceCoordinateCache)
            if hasattr(it, "enableAutoSIPrefix"):
                it.enableAutoSIPrefix(False)   # no label relayout when the range's magnitude changes
