#!/usr/bin/env bash
# The core is pure: no file under src/core/ may name Pingora, tokio, a socket type, or a module
# outside the core. Run by `make lint` (and so by `make test`).
set -euo pipefail
cd "$(dirname "$0")/.."
pattern='\bpingora|\btokio\b|\btokio::|TcpStream|TcpListener|UdpSocket|UnixStream|UnixListener|RawFd|crate::(app|ops|proxy|runtime|upstream)\b'
# Comments may speak of what the core is not; code may not name it.
if hits=$(grep -rnE "$pattern" src/core/ | grep -vE '^[^:]+:[0-9]+:\s*//'); then
  echo "src/core/ must stay pure (no Pingora, tokio, sockets or outer modules):" >&2
  echo "$hits" >&2
  exit 1
fi
echo "layers: src/core/ is pure ($(find src/core -name '*.rs' | wc -l) files)"
