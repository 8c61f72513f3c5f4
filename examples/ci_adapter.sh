#!/usr/bin/env bash
# CI: train the tiny recipe, publish a versioned signed adapter to a registry folder, verify it.
# Run from the repository root. Offline, CPU only, about a minute. Every step exits non-zero on failure (0 ok, 2 usage, 3 bad input,
# 4 verification failed, 5 environment refused), so the job fails at the step that went wrong.
#
#   VERSION=1.4.0 REGISTRY=/srv/adapters MSOV_KEY=/run/secrets/msov-ci examples/ci_adapter.sh
#
# MSOV_KEY is a key *base*: $MSOV_KEY.pem (private, from the CI secret store; passphrase, if any, in
# $MSOV_KEY_PASSPHRASE) and $MSOV_KEY.pub. Without one, a throw-away pair is made under $WORK.
set -euo pipefail

WORK="$(mkdir -p "${WORK:-runs/ci}" && cd "${WORK:-runs/ci}" && pwd)"   # absolute: the recipe resolves paths
VERSION="${VERSION:-0.1.${GITHUB_RUN_NUMBER:-$(date -u +%s)}}"
REGISTRY="${REGISTRY:-$WORK/registry}"
KEY="${MSOV_KEY:-$WORK/keys/ci}"
MSOV="${MSOV:-msov}"

# 1. a base model and a key (in real CI: your local base model folder and the CI signing key)
[ -f "$WORK/tiny-model/config.json" ] || $MSOV tiny-model "$WORK/tiny-model" --json > /dev/null
[ -f "$KEY.pem" ] || $MSOV keygen --out "$KEY" --json > /dev/null

# 2. train (a short run of the tiny recipe)
$MSOV finetune recipes/tiny-demo.yaml --set "model.path=$WORK/tiny-model" --set "output.dir=$WORK/run" \
    --set train.max_steps=30 --overwrite --json > "$WORK/finetune.json"

# 3. publish REGISTRY/tiny-demo/VERSION/ (an existing version with other content fails with exit 3)
$MSOV export "$WORK/run" --adapter --version "$VERSION" --registry "$REGISTRY" --key "$KEY.pem" \
    --json > "$WORK/export.json"
ADAPTER="$REGISTRY/tiny-demo/$VERSION"
ID=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["adapter_id"])' "$WORK/export.json")

# 4. verify as a consumer would: signature, every file, provenance; the id is the signed subject digest
$MSOV verify "$ADAPTER" --key "$KEY.pub" --sig "$ADAPTER/model.sig" --json > "$WORK/verify.json"
SIGNED=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["subject_digest"])' "$WORK/verify.json")
[ "$ID" = "$SIGNED" ] || { echo "adapter id $ID is not the signed digest $SIGNED" >&2; exit 4; }

$MSOV registry list "$REGISTRY" --pub "$KEY.pub"
echo "published tiny-demo $VERSION  sha256:$ID"
