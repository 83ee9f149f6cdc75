"""Before Qt starts: can its window-system plugin load on this machine?

On Linux desktops Qt draws through its xcb plugin, which needs a handful of X11 helper libraries
that minimal installations lack (libxcb-cursor0 since Qt 6.5, libxcb-icccm4, libxcb-keysyms1, ...).
Without them Qt prints a long plugin message and aborts the process, which Python cannot catch.
So the app asks the dynamic linker first (ldd on the plugin) and, when something is missing,
prints one line naming the packages to install. Qt is not imported here."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# shared library -> (Debian/Ubuntu package, Fedora package)
PACKAGES = {
    "libxcb-cursor.so.0": ("libxcb-cursor0", "xcb-util-cursor"),
    "libxcb-icccm.so.4": ("libxcb-icccm4", "xcb-util-wm"),
    "libxcb-keysyms.so.1": ("libxcb-keysyms1", "xcb-util-keysyms"),
    "libxcb-image.so.0": ("libxcb-image0", "xcb-util-image"),
    "libxcb-render-util.so.0": ("libxcb-render-util0", "xcb-util-renderutil"),
    "libxcb-randr.so.0": ("libxcb-randr0", "libxcb"),
    "libxcb-shape.so.0": ("libxcb-shape0", "libxcb"),
    "libxcb-xinerama.so.0": ("libxcb-xinerama0", "libxcb"),
    "libxcb-xkb.so.1": ("libxcb-xkb1", "libxcb"),
    "libxcb-sync.so.1": ("libxcb-sync1", "libxcb"),
    "libxcb-xfixes.so.0": ("libxcb-xfixes0", "libxcb"),
    "libxcb-shm.so.0": ("libxcb-shm0", "libxcb"),
    "libxcb-render.so.0": ("libxcb-render0", "libxcb"),
    "libxcb.so.1": ("libxcb1", "libxcb"),
    "libX11-xcb.so.1": ("libx11-xcb1", "libX11-xcb"),
    "libX11.so.6": ("libx11-6", "libX11"),
    "libxkbcommon-x11.so.0": ("libxkbcommon-x11-0", "libxkbcommon-x11"),
    "libxkbcommon.so.0": ("libxkbcommon0", "libxkbcommon"),
    "libEGL.so.1": ("libegl1", "libglvnd-egl"),
    "libGL.so.1": ("libgl1", "libglvnd-glx"),
    "libOpenGL.so.0": ("libopengl0", "libglvnd-opengl"),
    "libfontconfig.so.1": ("libfontconfig1", "fontconfig"),
    "libfreetype.so.6": ("libfreetype6", "freetype"),
    "libdbus-1.so.3": ("libdbus-1-3", "dbus-libs"),
    "libglib-2.0.so.0": ("libglib2.0-0", "glib2"),
}


def _qt_dir() -> Path | None:
    try:
        import importlib.util

        spec = importlib.util.find_spec("PySide6")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "Qt"


def _platform() -> str:
    """The platform plugin Qt will pick (the part of its choice that matters here)."""
    p = os.environ.get("QT_QPA_PLATFORM", "").split(":")[0].strip()
    if p:
        return p
    if os.environ.get("WAYLAND_DISPLAY") and os.environ.get("XDG_SESSION_TYPE") == "wayland":
        return "wayland"
    return "xcb"


def missing_libraries(files) -> list[str]:
    """Shared libraries the dynamic linker cannot find for these files (ldd's 'not found')."""
    missing: list[str] = []
    for f in files:
        try:
            out = subprocess.run(["ldd", str(f)], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            return []  # no ldd: let Qt try
        for line in out.splitlines():
            if "not found" in line:
                lib = line.split("=>")[0].strip()
                if lib not in missing:
                    missing.append(lib)
    return missing


def install_hint(missing: list[str]) -> str:
    deb = sorted({PACKAGES.get(m, (m, m))[0] for m in missing})
    rpm = sorted({PACKAGES.get(m, (m, m))[1] for m in missing})
    return (f"Qt cannot open a window: these system libraries are missing: {', '.join(missing)}. Install them "
            f"with: sudo apt-get install {' '.join(deb)}   (Debian/Ubuntu)   or: sudo dnf install {' '.join(rpm)}"
            "   (Fedora)")


def window_system_problem() -> str | None:
    """A one-line explanation when Qt's window-system plugin cannot load here, else None."""
    if not sys.platform.startswith("linux"):
        return None
    platform = _platform()
    qt = _qt_dir()
    if qt is None:
        return None
    plugin = qt / "plugins" / "platforms" / f"libq{platform}.so"
    if not plugin.exists():
        return None
    files = [plugin]
    if platform == "xcb":
        files.append(qt / "lib" / "libQt6XcbQpa.so.6")
    missing = missing_libraries([f for f in files if f.exists()])
    return install_hint(missing) if missing else None
