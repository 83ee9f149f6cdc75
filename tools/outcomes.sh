#!/usr/bin/env bash
# All outcome numbers and pictures in one command.
#
#   tools/outcomes.sh                                   # the embedded base model
#   BASE_MODEL=tools/_build/base_model_preview tools/outcomes.sh     # any other model folder
#
# Steps (each one's output goes to docs/outcomes/, logs included):
#   a) tools/eval_base.py on the base model                 -> base_eval.json
#   b) the default fine-tune, timed with /usr/bin/time -v, on sample_data/pirate_captain.jsonl and
#      sample_data/gyeongsang_ajumma.jsonl (with their _valid files), runs in tools/_build/runs/NAME
#                                                           -> train_NAME.log, train_NAME.time
#      and once more exactly as a user types it (no --validation-file; the run is then deleted)
#                                                           -> train_NAME_plain.log, train_NAME_plain.time
#   c) tools/persona_eval.py on both runs, with --base-model  -> persona_NAME.json, persona_NAME.txt
#   d) tools/plot_runs.py on both runs                       -> docs/loss_curves.png
#   e) tools/content_eval.py on the two FAQ samples, seeds 1 and 2: unseen rewordings answered
#      right, training answers reproduced, time, held-out bpb rise -> content_NAME.json
#   f) tools/paraphrase_probe.py on the base model            -> paraphrase_probe.json
#   g) a markdown summary with every number and before/after examples -> summary.md
#
# Environment:
#   BASE_MODEL   model folder to use (default: the embedded finetune_desktop/resources/base_model);
#                when set, `train` gets --base BASE_MODEL, otherwise it runs with no --base at all,
#                exactly as a user runs it
#   PYTHON       interpreter (default: /work/venv/bin/python if present, else python3)
#   OUTCOMES     output folder (default: docs/outcomes)
#   RUNS         run folders' parent (default: tools/_build/runs)
#   PLOT         loss-curve picture (default: docs/loss_curves.png)
#   NICE         e.g. "nice -n 19" to run everything at low priority (default: none; timings are
#                only meaningful on an otherwise idle machine)
#   TRAIN_ARGS   extra arguments for `train` (default: none = the default settings)
#   TIME_PLAIN   0 skips the second, validation-free timing of each fine-tune (default: 1)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x /work/venv/bin/python ]]; then PYTHON=/work/venv/bin/python; else PYTHON=python3; fi
fi
EMBEDDED=finetune_desktop/resources/base_model
BASE=${BASE_MODEL:-$EMBEDDED}
OUTCOMES=${OUTCOMES:-docs/outcomes}
RUNS=${RUNS:-tools/_build/runs}
PLOT=${PLOT:-docs/loss_curves.png}
read -r -a NICE_CMD <<< "${NICE:-}"
read -r -a EXTRA_TRAIN <<< "${TRAIN_ARGS:-}"

say() { printf '\n==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
trap 'printf "error: tools/outcomes.sh stopped at line %s (exit %s); see the logs in %s\n" "$LINENO" "$?" "$OUTCOMES" >&2' ERR

[[ -f "$BASE/config.json" ]] || die "no model in $BASE (config.json missing); export it first, or set BASE_MODEL=DIR"
[[ -x /usr/bin/time ]] || die "/usr/bin/time is missing (apt-get install time)"
"$PYTHON" -c 'import finetune_desktop' 2>/dev/null || die "$PYTHON cannot import finetune_desktop (set PYTHON=...)"
mkdir -p "$OUTCOMES" "$RUNS" "$(dirname "$PLOT")"
busy=$(pgrep -f 'pretrain_base\.py' 2>/dev/null | tr '\n' ' ' || true)
if [[ -n "$busy" ]]; then
    printf 'warning: tools/pretrain_base.py is still running (pid %s): wall times and tokens/s will be too slow\n' "${busy% }" >&2
fi

BASE_ARGS=()
if [[ -n "${BASE_MODEL:-}" ]]; then BASE_ARGS=(--base "$BASE"); fi

PERSONAS=(pirate gyeongsang)
declare -A DATA=([pirate]=sample_data/pirate_captain.jsonl [gyeongsang]=sample_data/gyeongsang_ajumma.jsonl)
for name in "${PERSONAS[@]}"; do
    [[ -f "${DATA[$name]}" && -f "${DATA[$name]%.jsonl}_valid.jsonl" ]] || die "${DATA[$name]} or its _valid file is missing"
done

T0=$(date +%s)
say "a) base model: tools/eval_base.py $BASE"
"${NICE_CMD[@]}" "$PYTHON" tools/eval_base.py "$BASE" > "$OUTCOMES/.base_eval.json.tmp" 2> "$OUTCOMES/base_eval.log" \
    || { cat "$OUTCOMES/base_eval.log" >&2; die "tools/eval_base.py failed"; }
mv -f "$OUTCOMES/.base_eval.json.tmp" "$OUTCOMES/base_eval.json"
"$PYTHON" - "$OUTCOMES/base_eval.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1], encoding="utf-8"))
print("   held-out bpb %.4f, ended %.0f%%, distinct-2 %.3f, %s tokens/s" % (
    d.get("heldout_bpb", float("nan")), 100 * d.get("ended_fraction", 0), d.get("distinct_2", 0),
    d.get("generate_tokens_per_s")))
EOF

RUN_SPECS=()
for name in "${PERSONAS[@]}"; do
    data=${DATA[$name]}
    valid=${data%.jsonl}_valid.jsonl
    run="$RUNS/$(basename "${data%.jsonl}")"
    rm -f -- "$OUTCOMES/train_$name".{log,time} "$OUTCOMES/train_${name}_plain".{log,time} "$OUTCOMES/persona_$name".{json,txt}
    if [[ -e "$run" ]]; then
        [[ -f "$run/run.json" || -z "$(ls -A "$run")" ]] || die "$run exists and is not a run folder; move it away"
        rm -rf -- "$run"
    fi
    say "b) default fine-tune on $data (timed)"
    echo "   $PYTHON -m finetune_desktop train $data --validation-file $valid --out $run ${BASE_ARGS[*]} ${EXTRA_TRAIN[*]}"
    if ! "${NICE_CMD[@]}" /usr/bin/time -v -o "$OUTCOMES/train_$name.time" \
            "$PYTHON" -m finetune_desktop train "$data" --validation-file "$valid" --out "$run" \
            "${BASE_ARGS[@]}" "${EXTRA_TRAIN[@]}" > "$OUTCOMES/train_$name.log" 2>&1; then
        tail -n 20 "$OUTCOMES/train_$name.log" >&2
        die "fine-tuning on $data failed (log: $OUTCOMES/train_$name.log)"
    fi
    tail -n 4 "$OUTCOMES/train_$name.log" | sed 's/^/   /'
    grep -E "Elapsed \(wall|Maximum resident" "$OUTCOMES/train_$name.time" | sed 's/^[[:space:]]*/   /'

    if [[ "${TIME_PLAIN:-1}" != 0 ]]; then
        # the 60-s target is about the default command; --validation-file adds ~13 evaluations
        plain="$run.plain"
        rm -rf -- "$plain"
        say "b2) the same without --validation-file (timed): train $data --out $plain"
        "${NICE_CMD[@]}" /usr/bin/time -v -o "$OUTCOMES/train_${name}_plain.time" \
            "$PYTHON" -m finetune_desktop train "$data" --out "$plain" "${BASE_ARGS[@]}" "${EXTRA_TRAIN[@]}" \
            > "$OUTCOMES/train_${name}_plain.log" 2>&1 \
            || { tail -n 20 "$OUTCOMES/train_${name}_plain.log" >&2; die "fine-tuning (no validation) on $data failed"; }
        grep -E "Elapsed \(wall|Maximum resident" "$OUTCOMES/train_${name}_plain.time" | sed 's/^[[:space:]]*/   /'
        rm -rf -- "$plain"
    fi

    say "c) persona check: tools/persona_eval.py $run --persona $name --base-model $BASE"
    "${NICE_CMD[@]}" "$PYTHON" tools/persona_eval.py "$run" --persona "$name" --base-model "$BASE" \
        --json "$OUTCOMES/persona_$name.json" > "$OUTCOMES/persona_$name.txt" 2>&1 \
        || { cat "$OUTCOMES/persona_$name.txt" >&2; die "tools/persona_eval.py failed for $name"; }
    sed -n '1,16p' "$OUTCOMES/persona_$name.txt" | sed 's/^/   /'
    RUN_SPECS+=(--run "$name=$run")
done

say "d) loss curves -> $PLOT"
RUN_DIRS=()
for name in "${PERSONAS[@]}"; do RUN_DIRS+=("$RUNS/$(basename "${DATA[$name]%.jsonl}")"); done
"${NICE_CMD[@]}" "$PYTHON" tools/plot_runs.py "${RUN_DIRS[@]}" --out "$PLOT" | sed 's/^/   /'

CONTENT_SPECS=()
for faq in bike_shop gimbap_cafe_ko; do
    say "e) content: tools/content_eval.py on sample_data/faq_$faq.jsonl (seeds 1 and 2)"
    "${NICE_CMD[@]}" "$PYTHON" tools/content_eval.py --data "sample_data/faq_$faq.jsonl" \
        --quiz "sample_data/faq_${faq}_quiz.jsonl" --seeds 1 2 --runs "$RUNS/content" "${BASE_ARGS[@]}" \
        --json "$OUTCOMES/content_$faq.json" ${TRAIN_ARGS:+-- ${TRAIN_ARGS}} 2> "$OUTCOMES/content_$faq.log" \
        | sed 's/^/   /' || { tail -n 20 "$OUTCOMES/content_$faq.log" >&2; die "tools/content_eval.py failed for $faq"; }
    CONTENT_SPECS+=(--content "$OUTCOMES/content_$faq.json")
done

say "f) the base model alone: tools/paraphrase_probe.py"
"${NICE_CMD[@]}" "$PYTHON" tools/paraphrase_probe.py "$BASE" \
    --data sample_data/faq_bike_shop.jsonl --quiz sample_data/faq_bike_shop_quiz.jsonl \
    --data sample_data/faq_gimbap_cafe_ko.jsonl --quiz sample_data/faq_gimbap_cafe_ko_quiz.jsonl \
    > "$OUTCOMES/paraphrase_probe.json"
sed 's/^/   /' "$OUTCOMES/paraphrase_probe.json"

say "g) summary -> $OUTCOMES/summary.md"
"$PYTHON" -c 'import sys; sys.path.insert(0, "tools"); import persona_eval; raise SystemExit(persona_eval.summary_main(sys.argv[1:]))' \
    --outcomes "$OUTCOMES" --base "$BASE" "${RUN_SPECS[@]}" "${CONTENT_SPECS[@]}" | sed 's/^/   /'

trap - ERR
say "done in $(( $(date +%s) - T0 )) s: $OUTCOMES/summary.md, $PLOT (base model: $BASE)"
