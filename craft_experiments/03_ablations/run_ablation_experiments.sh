#!/usr/bin/env bash
# Ablations of CRaFT on SUITES (default libero_spatial) x SEEDS; each variant is trained and evaluated.
#
# Groups (ABLATIONS, default all of them):
#   reference      baseline SFT and CRaFT with default settings (the rows every other variant is compared with)
#   projection     CRaFT without the conflict-aware projection
#   dual           CRaFT without the adaptive lambda, lambda fixed at each of FIXED_LAMBDAS [0 0.1 1]
#   anchor_type    raw_only and aq_only anchors (concat is the reference)
#   epsilon        retention budget sweep EPSILON_SWEEP [0.02 0.05 0.2 0.5] (the reference epsilon is not repeated)
#   layer          Raw-latent layer m sweep RAW_LAYER_SWEEP [6 18] (SMOKE: SMOKE_RAW_LAYER_SWEEP [1 3]); M stays
#   anchor_source  offline anchors: builds the cache with vla-scripts/build_craft_cache.py first, then trains
#   related        related-work baselines in the same framework: align (--retention_method align) and freeze
#                  (--freeze_vision_backbone True). They need those finetune.py features: with DRY_RUN they are
#                  always printed; otherwise RELATED_BASELINES=auto runs them only if `finetune.py --help` lists
#                  the flag (1: always, 0: never).
source "$(dirname "${BASH_SOURCE[0]}")/../common_utils/runner.sh"

SUITES="${SUITES:-libero_spatial}"
cx_init ablations
all_groups="reference projection dual anchor_type epsilon layer anchor_source related"
groups="${ABLATIONS:-$all_groups}"
for group in $groups; do
    [[ " $all_groups " == *" $group "* ]] || cx_die "ABLATIONS: unknown group '$group' (known: $all_groups)"
done
fixed_lambdas="${FIXED_LAMBDAS:-0 0.1 1}"
epsilons="${EPSILON_SWEEP:-0.02 0.05 0.2 0.5}"
if ((CX_SMOKE)); then raw_layers="${SMOKE_RAW_LAYER_SWEEP:-1 3}"; else raw_layers="${RAW_LAYER_SWEEP:-6 18}"; fi
for value in $fixed_lambdas $epsilons; do cx_require_number "FIXED_LAMBDAS/EPSILON_SWEEP entry" "$value"; done
for value in $raw_layers; do cx_require_int "RAW_LAYER_SWEEP entry" "$value" 0; done

has_group() { [[ " $groups " == *" $1 "* ]]; }
same_number() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a + 0 == b + 0) }'; }

# variant <suite> <steps> <name> <method> [craft overrides...]: one variant over every seed.
variant() {
    local suite="$1" steps="$2" name="$3" method="$4" seed
    shift 4
    cx_method_flags "$method" "$@"
    for seed in $CX_SEEDS; do
        cx_train_and_eval "abl-$suite-$name-s$seed" "$suite" "$seed" "$steps" "$name" "${CX_METHOD_FLAGS[@]}"
    done
}

for suite in $CX_SUITES; do
    steps="$(cx_max_steps "$suite")"
    cx_note "suite $suite: $steps steps"
    if has_group reference; then
        variant "$suite" "$steps" baseline baseline
        variant "$suite" "$steps" craft craft
    fi
    if has_group projection; then
        variant "$suite" "$steps" craft-noproj craft projection=False
    fi
    if has_group dual; then
        for lam in $fixed_lambdas; do
            variant "$suite" "$steps" "craft-fixlam$lam" craft dual=False fixed_lambda="$lam"
        done
    fi
    if has_group anchor_type; then
        for anchor in raw_only aq_only; do
            variant "$suite" "$steps" "craft-anchor_$anchor" craft anchor_type="$anchor"
        done
    fi
    if has_group epsilon; then
        for eps in $epsilons; do
            if same_number "$eps" "$CX_EPSILON"; then
                cx_note "epsilon $eps is the reference CRaFT run; not repeated"
                continue
            fi
            variant "$suite" "$steps" "craft-eps$eps" craft budget="$eps"
        done
    fi
    if has_group layer; then
        for m in $raw_layers; do
            variant "$suite" "$steps" "craft-m$m" craft raw_layer="$m"
        done
    fi
    if has_group anchor_source; then
        cx_build_cache "$suite" "" "" concat
        variant "$suite" "$steps" craft-offline craft anchor_source=offline cache_dir="$CX_CACHE_DIR"
    fi
    if has_group related; then
        for seed in $CX_SEEDS; do
            cx_guarded_train_and_eval --retention_method "abl-$suite-align-s$seed" "$suite" "$seed" "$steps" align \
                --use_craft False --retention_method align
            cx_guarded_train_and_eval --freeze_vision_backbone "abl-$suite-freeze-s$seed" "$suite" "$seed" "$steps" \
                freeze --use_craft False --freeze_vision_backbone True
        done
    fi
done
cx_finish
