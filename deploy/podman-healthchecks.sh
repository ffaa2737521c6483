#!/usr/bin/env bash
# Podman schedules health checks with systemd timers; where there is no systemd (as on these
# machines) nothing runs them and `depends_on: service_healthy` would wait forever. This plays
# the scheduler's part for one compose project, running each of its containers' own health
# check every 2 s as Docker would, until it is killed. Used by deploy/compose-test.sh and
# deploy/chaos-compose.sh, in the background, when the engine is podman:
#   deploy/podman-healthchecks.sh PROJECT &
set -u
project=${1:?"the compose project"}
while sleep 2; do
    for id in $(podman ps -q --filter "label=com.docker.compose.project=$project"); do
        podman healthcheck run "$id" >/dev/null 2>&1 || true
    done
done
