#!/usr/bin/env bash
# Installs what building and testing need on a fresh Debian/Ubuntu machine that has only the
# Rust toolchain: a C toolchain and cmake (Pingora's zlib-ng), Python with venv (end-to-end tests
# against a real sse-starlette runtime), Node.js and npm (the Express legacy stand-in), Chromium (the
# browser test), promtool (alert rule tests), nginx, HAProxy, wrk and valgrind (benchmarks).
# Usage: scripts/install-deps.sh [build|test|bench]
set -euo pipefail
need=${1:-build}

pkgs=()
command -v cc >/dev/null || pkgs+=(build-essential)
command -v cmake >/dev/null || pkgs+=(cmake)
if [ "$need" = test ] || [ "$need" = bench ]; then
  command -v python3 >/dev/null || pkgs+=(python3)
  python3 -m venv --help >/dev/null 2>&1 || pkgs+=(python3-venv)
  command -v promtool >/dev/null || pkgs+=(prometheus)
  command -v curl >/dev/null || pkgs+=(curl)
  # The legacy stand-in runs the product's Express stack; the browser test drives Chromium.
  command -v node >/dev/null || pkgs+=(nodejs)
  command -v npm >/dev/null || pkgs+=(npm)
fi
if [ "$need" = test ]; then
  command -v chromium >/dev/null || pkgs+=(chromium)
fi
if [ "$need" = bench ]; then
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || pkgs+=(nginx-light)
  command -v wrk >/dev/null || pkgs+=(wrk)
  command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || pkgs+=(haproxy)
  # Instruction counts (bench section 6): callgrind, callgrind_control.
  command -v valgrind >/dev/null || pkgs+=(valgrind)
fi
[ ${#pkgs[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing: ${pkgs[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
