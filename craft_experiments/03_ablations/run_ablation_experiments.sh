#!/usr/bin/env bash
# Ablations of CRaFT on SUITES (default libero_spatial) x SEEDS; each variant is trained and evaluated.
#
# Groups (ABLATIONS, default all of them; SMOKE alone: reference projection anchor_source, SMOKE_FULL=1: all):
#   reference      baseline SFT and CRaFT with default settings (the rows every other variant is compared with)
#   projection     CRaFT without the conflict-aware projection
#   dual           CRaFT without the adaptive lambda, lambda fixed at each of FIXED_LAMBDAS [0 0.1 1]
#   anchor_type    raw_only and aq_only anchors (concat is the reference)
#   epsilon        retention budget sweep EPSILON_SWEEP [0.02 0.05 0.2 0.5] (the reference epsilon is not repeated)
#   layer          Raw-latent layer m sweep RAW_LAYER_SWEEP [6 18] (SMOKE: SMOKE_RAW_LAYER_SWEEP [1 3]); M stays
#   anchor_source  offline anchors: builds the cache with vla-scripts/build_craft_cache.py first, then trains
#   related        related-work baselines in the same framework: align (--retention_method align) and freeze
#                  (--freeze_vision_backbone True).
# The grid itself lives in craft_experiments/common_utils/grid.py (docs/EXPERIMENTS_AND_TRAINING.md).
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="$here/../../.venv/bin/python"
[[ -x "$python" ]] || python="$(command -v python3 || command -v python)"
exec "$python" "$here/../common_utils/grid.py" ablations
