# Shell helpers the serving benchmark scripts source: a free local port, and waiting for a server.

free_port() {  # a fixed port clashed with another session's server once
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for_server() {  # URL PID: until URL answers (up to 300 s); fails at once if the process PID is gone
  for _ in $(seq 1 300); do
    if curl -sf "$1" > /dev/null; then return 0; fi
    if ! kill -0 "$2" 2> /dev/null; then echo "server for $1 died" >&2; return 1; fi
    sleep 1
  done
  echo "server for $1 did not answer within 300 s" >&2; return 1
}
