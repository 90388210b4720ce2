"""Find the peer tools, installing the Debian packages that provide them when missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig

# tool -> Debian package
TOOLS = {
    "mksquashfs": "squashfs-tools",
    "unsquashfs": "squashfs-tools",
    "squashfuse": "squashfuse",
    "mkfs.erofs": "erofs-utils",
    "tar": "tar",
    "fusermount3": "fuse3",
}


def which(tool: str) -> str | None:
    return shutil.which(tool) or next(
        (p for p in (f"/usr/bin/{tool}", f"/usr/sbin/{tool}", f"/sbin/{tool}") if os.access(p, os.X_OK)), None
    )


def ensure(install: bool = True, log=print) -> dict[str, str | None]:
    """Paths of every peer tool; with ``install``, ``apt-get install -y`` the
    packages of the missing ones first (needs root and apt)."""
    missing = sorted({pkg for tool, pkg in TOOLS.items() if not which(tool)})
    if missing and install:
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            log(f"  peers missing ({', '.join(missing)}) and cannot install (need root and apt-get)")
        else:
            log(f"  installing {' '.join(missing)} ...")
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, stdout=subprocess.DEVNULL)
            r = subprocess.run(
                ["apt-get", "install", "-y", "-qq", *missing],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            if r.returncode:
                log(f"  apt-get install failed: {r.stderr.strip()[-500:]}")
    return {tool: which(tool) for tool in TOOLS}


def versions(paths: dict[str, str | None]) -> dict[str, str]:
    """One-line version strings for the machine description."""
    out = {}

    def first_line(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            text = (r.stdout or r.stderr).strip().splitlines()
            return text[0] if text else "?"
        except (OSError, subprocess.SubprocessError):
            return "?"

    if paths.get("mksquashfs"):
        out["squashfs-tools"] = first_line([paths["mksquashfs"], "-version"])
    if paths.get("squashfuse"):
        out["squashfuse"] = _dpkg_version("squashfuse")
    if paths.get("mkfs.erofs"):
        out["erofs-utils"] = _dpkg_version("erofs-utils")
    if paths.get("tar"):
        out["tar"] = first_line([paths["tar"], "--version"])
    out["python"] = sys.version.split()[0]
    return out


def _dpkg_version(pkg: str) -> str:
    try:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, timeout=10)
        return f"{pkg} {r.stdout.strip()}" if r.returncode == 0 else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def cimfs_command() -> list[str] | None:
    """How to run the ``cimfs`` CLI, or None when it does not exist yet.

    The console script pip installed beside this interpreter comes first: a
    ``cimfs`` earlier on PATH may be a wrapper (pyenv's shims are bash
    scripts that cost ~70 ms a start), which would time the wrapper, not cimfs.
    The package's bytecode is compiled first, as a pip install does: an
    editable install under PYTHONDONTWRITEBYTECODE=1 would otherwise compile
    every module from source at each start (~60 ms)."""
    _compile_package()
    exe = os.path.join(sysconfig.get_path("scripts"), "cimfs")
    if not os.access(exe, os.X_OK):
        exe = shutil.which("cimfs")
    cmd = [exe] if exe else [sys.executable, "-m", "cimfs.cli"]
    try:
        r = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return cmd if r.returncode == 0 else None


def _compile_package() -> None:
    try:
        import cimfs
    except ImportError:
        return
    import compileall

    compileall.compile_dir(os.path.dirname(cimfs.__file__), quiet=1)


def cimfs_has(cmd: list[str] | None, sub: str) -> tuple[bool, str]:
    """(available, help text) for ``cimfs SUB``."""
    if not cmd:
        return False, ""
    try:
        r = subprocess.run([*cmd, sub, "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False, ""
    return r.returncode == 0, r.stdout
