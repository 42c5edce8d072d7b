#!/usr/bin/env bash
# Golden-Gate-style steering on the embedded SmolLM2-135M-Instruct: find a "Paris / France" feature in a
# TopK SAE on layer 15's residual stream, turn it up in unrelated conversations, and measure the trade-off.
# Run from the repository root after `make scan` (or scripts/setup.sh). Steps 1-2 take ~40 min on 2 CPU cores.
set -euo pipefail
MRI=${MRI:-.venv/bin/mri}
RUN=${RUN:-runs/demo}

# 1. the dictionary (streamed from the model, no store), then 2. its atlas
[ -f "$RUN/sae/cfg.json" ] || $MRI train smollm2-135m-instruct --site resid.15 --tokens 3000000 --out "$RUN/sae"
[ -f "$RUN/sae/atlas.sqlite" ] || $MRI atlas "$RUN/sae" --tokens 400000

# 3. a feature that peaks on Paris / France / French (its index differs from run to run)
F=$($MRI search "$RUN/sae/atlas.sqlite" paris france french --limit 1 | cut -f1)
$MRI feature "$RUN/sae/atlas.sqlite" "$F" --examples 3

# 4. steered next to unsteered: clamp it to 2x its max activation at every position
$MRI steer smollm2-135m-instruct --prompts examples/steering/prompts.txt --feature "resid.15/$RUN/sae#$F=x2"

# 5. the trade-off: concept presence vs perplexity for the clamp, a diff-of-means vector and prompting
$MRI steer smollm2-135m-instruct --prompts examples/steering/prompts.txt --feature "resid.15/$RUN/sae#$F=x1" \
    --sweep 0.25,0.5,1,2,4 --concept "Paris and France" --out "$RUN/sweep-paris"
echo "curve: $RUN/sweep-paris/curve.svg"
