# Sourced by the scripts that need a registry (bash).
#
# start_registry NAME starts a docker-registry on a free loopback port,
# storing under $W/NAME (config and log beside it), waits until it
# answers, appends its pid to the caller's pids array (which its cleanup
# kills) and sets REG to its host:port. It is not run in a subshell (as
# in $(start_registry x)): the pid would not reach pids.
start_registry() {
  local name=$1 port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  cat >"$W/$name.yml" <<EOT
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $W/$name}}
http: {addr: 127.0.0.1:$port}
EOT
  docker-registry serve "$W/$name.yml" >"$W/$name.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$port/v2/" >/dev/null 2>&1 && break; sleep 0.1; done
  curl -fsS "http://127.0.0.1:$port/v2/" >/dev/null || { cat "$W/$name.log" >&2; return 1; }
  REG=127.0.0.1:$port
}
