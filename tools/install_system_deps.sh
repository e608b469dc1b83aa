#!/usr/bin/env bash
# Debian packages for headless MuJoCo rendering: EGL (default) and OSMesa (fallback).
# Installs only what is missing; without apt (or root) it says so in one line and carries on.
set -u
PACKAGES=(libegl1 libegl-mesa0 libgl1-mesa-dri libosmesa6)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_system_deps: no apt-get here; install ${missing[*]} (or your distro's EGL/OSMesa) for LIBERO rendering"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo"; else
    echo "install_system_deps: not root; run: sudo apt-get install -y ${missing[*]} (needed for LIBERO rendering)"
    exit 0
  fi
fi
echo "install_system_deps: installing ${missing[*]}"
$SUDO apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
  || echo "install_system_deps: apt-get failed; install ${missing[*]} by hand for LIBERO rendering"
