#!/bin/sh
# The node container's entry point: `ainode serve` with the arguments given (default: --config
# /etc/ainode/node.yaml). With AINODE_RAY_JOIN=<head>:<port> the container first joins that Ray cluster as
# a node that runs no jobs itself (a Ray driver must run on a node of its cluster), for run.executor: ray.
set -e
if [ -n "${AINODE_RAY_JOIN:-}" ]; then
  ray start --address="$AINODE_RAY_JOIN" --num-cpus=0 --num-gpus=0
fi
exec ainode serve "$@"
