#!/usr/bin/env bash
# Runs ON the GPU machine, from the repository root, once per `run` call (see bench/gpu/README.md).
#
#   bash bench/gpu/stage_and_run.sh stage [--no-drive]
#       Copies the carried part (.whl/parts/pNN) into /tmp/stage. With p00 (early.tar: the
#       compression stack) it installs /tmp/site-llmc. Once every part is there it joins rest.tar with
#       cat, checks it, and installs /tmp/site-vllm (vLLM 0.26.0, its extras, bitsandbytes, the
#       project's plugin for structurally pruned checkpoints). (--no-drive: accepted, as before.)
#   bash bench/gpu/stage_and_run.sh twin
#       After p00: the full-size twin's build (`search make-twin`) in the background.
#   bash bench/gpu/stage_and_run.sh product [TRIALS [search run options]]
#       After every part is staged: `python -m search run` itself on the twin (GPU space, fidelity
#       quality), the orchestrator from /tmp/site-orch + /tmp/site-vllm, each environment through a wrapper script.
#       On a machine of several GPUs, `search run --gpus all`: one worker per GPU, one study.
#   bash bench/gpu/stage_and_run.sh l4study [TRIALS [RESULTS_DIR]]
#       `product` with issue 25's study options (L4_STUDY below), resuming the study whose stores a
#       committed bench/results folder holds, with the compile cache earlier `stage` calls took from .study/.
#       RUN_TIMEOUT=S before it: `--timeout S`, no trial started that would end after S seconds.
#   bash bench/gpu/stage_and_run.sh l4again [TRIALS [RESULTS_DIR]]
#       l4study, with the reference enqueued once more and measured again (reference-again.yaml).
#   bash bench/gpu/stage_and_run.sh client TRIAL [client_replay.py options]
#       After every part is staged, on the study `product`/`l4study` ran (or .study/ carries):
#       bench/client_replay.py, vLLM's own client (`vllm bench serve`) on that trial's vllm_config.yaml,
#       NVML around it, in the background; `wait` follows it and brings back client-replay.json.
#   bash bench/gpu/stage_and_run.sh wait SECONDS
#       Follows the benchmark until it ends or SECONDS pass (printing the log lines no earlier wait
#       printed, the last ones too), then copies its results to $OUT.
#   bash bench/gpu/stage_and_run.sh stop
#       SIGTERM to the run (its running trial is recorded as failed, retried next run), then as wait.
#   bash bench/gpu/stage_and_run.sh cache GROUP
#       After the run ended: vLLM's compile cache, pieces of 15 MB, up to 4 a call where they fit beside
#       what the call sent first (GROUP 0, 1, ...; 0 packs it, its newest compiles up to CACHE_CAP_MIB on
#       disk, default 1024; later groups send the pieces not sent yet).
#
# pip install --no-index --no-deps --target: nothing is resolved or fetched there.
set -uo pipefail
S=/tmp/stage
OUTDIR=/tmp/bench-out
CODE=/tmp/bench-code
mkdir -p "$S" "$OUTDIR"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

# $OUT brings back 8 files, 64 MiB together: keep a slot for server-logs.txt and 2 MB of margin
fits() {  # fits FILES BYTES: would FILES more files of BYTES together still come back?
  local n b reserve=0
  [ -d "$OUTDIR/server-logs" ] && [ ! -f "$OUT/server-logs.txt" ] && reserve=1
  n=$(find "$OUT" -type f | wc -l)
  b=$(find "$OUT" -type f -print0 | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
  [ $((n + $1 + reserve)) -le 8 ] && [ $((${b:-0} + $2)) -le 62000000 ]
}

send_back() {  # FILE: into $OUT whole, or (over the 16 MiB $OUT takes a file) as 15 MB pieces FILE.NN,
  # each only where it still fits
  local file=$1 name size pieces part psize
  name=$(basename "$file"); size=$(stat -c %s "$file")
  if [ "$size" -le 15000000 ]; then
    if fits 1 "$size"; then cp "$file" "$OUT/"; echo "$name: $size bytes"
    else echo "$name not brought back: $size bytes, over what \$OUT takes"; fi
    return 0
  fi
  pieces="$OUTDIR/$name-pieces"
  rm -rf "$pieces" && mkdir -p "$pieces" && split -b 15000000 -d -a 2 "$file" "$pieces/$name."
  for part in "$pieces/$name".*; do
    psize=$(stat -c %s "$part")
    if fits 1 "$psize"; then cp "$part" "$OUT/"; echo "$(basename "$part"): $psize bytes ($name is $size)"
    else echo "$(basename "$part") not brought back: $psize bytes, over what \$OUT takes"; fi
  done
}

collect() {  # results back through $OUT (at most 8 files: a drive returns 7, a product run 5)
  [ -n "${OUT:-}" ] || return 0
  for f in results.md results.jsonl env.json driver.log compress.log product.log; do
    [ -f "$OUTDIR/$f" ] && cp "$OUTDIR/$f" "$OUT/"
  done
  for f in client-replay.json client.log; do  # a `client` run's, until a product run writes after it
    [ -f "$OUTDIR/$f" ] && [ "$OUTDIR/$f" -nt "$OUTDIR/product.log" ] && cp "$OUTDIR/$f" "$OUT/"
  done
  ls "$OUTDIR"/product-gpu*.log > /dev/null 2>&1 && tail -n +1 "$OUTDIR"/product-gpu*.log > "$OUT/product-workers.log"
  # stage.log only until the product has a study: after that the study needs the slots
  [ -f "$S/stage.log" ] && [ ! -f /tmp/product/optuna.db ] && cp "$S/stage.log" "$OUT/"
  if [ -f /tmp/product/optuna.db ]; then  # the product's study: its status, export and stores
    local orch="PYTHONPATH=/tmp/site-orch:/tmp/site-vllm:$CODE"
    local study; study=$(cat "$S/study" 2>/dev/null || echo gemma4-energy)
    (cd "$CODE" && env "$orch" python3 -m search status --home /tmp/product --study "$study" > "$OUT/product-status.txt" 2>&1
     rm -rf "$OUTDIR/product-export" && env "$orch" python3 -m search export --home /tmp/product --study "$study" \
       --out "$OUTDIR/product-export" >> "$OUT/product-status.txt" 2>&1)
    # the baseline files are large: they travel in baseline.tgz below
    tar -czf "$OUTDIR/product-study.tgz" --exclude=cache --exclude=data --exclude=models --exclude="*.png" \
      --exclude='baseline-*' -C /tmp product -C "$OUTDIR" product-export 2>/dev/null
    send_back "$OUTDIR/product-study.tgz"  # pieces, if any, are joined by bench/gpu/merge_study.sh
    # the baseline: a study without its baseline cannot be compared
    local baseline; baseline=$(cd /tmp && ls product/studies/*/baseline-*.json 2>/dev/null)
    if [ -n "$baseline" ]; then
      # packed again only when a baseline file changed (it is made once a study, ~27 MB of answers)
      [ -f "$OUTDIR/baseline.tgz" ] && [ -z "$(cd /tmp && find $baseline -newer "$OUTDIR/baseline.tgz")" ] \
        || tar -czf "$OUTDIR/baseline.tgz" -C /tmp $baseline
      send_back "$OUTDIR/baseline.tgz"  # pieces joined with cat baseline.tgz.*
    fi
  fi
  if [ -d "$OUTDIR/server-logs" ]; then
    for f in "$OUTDIR"/server-logs/*.log; do
      [ -f "$f" ] || continue
      echo "===== $(basename "$f") (first 150 and last 150 lines)"; head -150 "$f"; echo "....."; tail -150 "$f"
    done > "$OUT/server-logs.txt"
  fi
}

stop() {  # SIGTERM to the run: its running trial is recorded as failed and retried on the next run
  # (by pid: `pkill -f "search run"` also matches the shell of the call that sends it, and kills that call)
  driver_running || { echo "no run is going on"; collect; return 0; }
  kill -TERM "$(cat "$S/driver.pid")"
  local t0=$SECONDS; while driver_running && [ $((SECONDS - t0)) -lt 90 ]; do sleep 1; done
  driver_running && echo "== still running $((SECONDS - t0)) s after SIGTERM" || echo "== run stopped in $((SECONDS - t0)) s"
  tail -3 "$OUTDIR/product.log"
  collect
}

bring_cache() {  # GROUP: vLLM's compile cache, packed once when GROUP is 0, then pieces of 15 MB, up to 4 a call
  # (a 7-trial study's cache packs to ~206 MB: more than $OUT takes in one call; the run's `wait` calls
  # no longer pack it, which cost each of them ~20 s of device time). Join the pieces with cat.
  local group=${1:-0} pieces="$OUTDIR/cache-pieces" piece
  driver_running && { echo "a run is going on: stop it first (the cache must not change between groups)"; return 1; }
  [ -d /tmp/product/cache/vllm ] || { echo "no compile cache under /tmp/product/cache/vllm"; return 1; }
  if [ "$group" = 0 ] || [ ! -d "$pieces" ]; then
    # vLLM keys a compile by quantization, KV dtype, max_num_seqs and max_num_batched_tokens, so a study
    # piles up compiles that few later trials hit: the newest, up to CACHE_CAP_MIB on disk (default 1024,
    # ~150 MB packed), and everything else (Triton's kernels, shared by all). The study needs none of it.
    local members=() used=0 size stamp dir cap=$(( ${CACHE_CAP_MIB:-1024} * 1024 )) left=0
    for dir in /tmp/product/cache/vllm/*; do
      [ "$(basename "$dir")" = torch_compile_cache ] || members+=("vllm/$(basename "$dir")")
    done
    while read -r stamp dir; do
      size=$(du -sk "$dir" | cut -f1)
      if [ $((used + size)) -le "$cap" ]; then members+=("vllm/torch_compile_cache/$(basename "$dir")"); used=$((used + size))
      else left=$((left + 1)); fi
    done < <(find /tmp/product/cache/vllm/torch_compile_cache -mindepth 1 -maxdepth 1 -type d -printf '%T@ %p\n' 2>/dev/null | sort -rn)
    rm -rf "$pieces" && mkdir -p "$pieces"
    tar -czf - -C /tmp/product/cache "${members[@]}" | split -b 15000000 -d -a 2 - "$pieces/compile-cache.tgz."
    echo "compile cache: $(du -sh /tmp/product/cache/vllm | cut -f1) on disk, $(( (used + 512) / 1024 )) MiB of compiles kept," \
      "$left older ones left out; $(cat "$pieces"/* | wc -c) bytes packed in $(ls "$pieces" | wc -l) pieces," \
      "sha256 $(cat "$pieces"/* | sha256sum | cut -d' ' -f1)"
  fi
  # As many as $OUT still takes beside what this call put there first: on 2026-12-08 a `stop` before
  # it packed the study, four pieces beside that passed the 64 MiB, and the study's pack was left out.
  local sent=0
  mkdir -p "$pieces/sent"
  for piece in "$pieces"/compile-cache.tgz.*; do
    [ -f "$piece" ] && [ "$sent" -lt 4 ] && fits 1 "$(stat -c %s "$piece")" || break
    echo "$(basename "$piece"): $(stat -c %s "$piece") bytes"
    cp "$piece" "$OUT/" && mv "$piece" "$pieces/sent/" && sent=$((sent + 1))
  done
  if ! compgen -G "$pieces/compile-cache.tgz.*" > /dev/null; then echo "== last group: every piece is back"
  else echo "== $sent piece(s) this call; next: cache $((group + 1))"; fi
}

driver_running() { [ -f "$S/driver.pid" ] && kill -0 "$(cat "$S/driver.pid")" 2>/dev/null; }

stage() {
  local t0=$SECONDS
  for d in .whl/parts/p*; do
    [ -d "$d" ] || continue
    for f in "$d"/*; do [ -f "$S/$(basename "$f")" ] || cp "$f" "$S/"; done
    echo "staged $d: $(ls "$d" | tr '\n' ' ')"
  done
  if [ -f "$S/early.tar" ] && [ ! -f "$S/llmc.ok" ]; then
    echo "== machine"; nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,power.draw,temperature.gpu --format=csv
    df -h / /tmp /dev/shm | sed 's/^/  /'; free -g | sed 's/^/  /'; nproc; python3 --version; python3 -m pip --version
    python3 -c "import pyarrow, fsspec, huggingface_hub as h; print('pyarrow', pyarrow.__version__, 'fsspec', fsspec.__version__, 'hub', h.__version__)"
    mkdir -p "$S/early" && tar -C "$S/early" -xf "$S/early.tar" || return 1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-llmc \
      "$S"/early/common/*.whl "$S"/early/llmc/*.whl >> "$S/stage.log" 2>&1 || { echo "llmc install FAILED"; tail -20 "$S/stage.log"; return 1; }
    PYTHONPATH=/tmp/site-llmc python3 -c "import llmcompressor, compressed_tensors, datasets; print('llmcompressor', llmcompressor.__version__, 'compressed-tensors', compressed_tensors.__version__, 'datasets', datasets.__version__)" 2>&1 | tail -3
    touch "$S/llmc.ok"
  fi
  [ "${1:-}" = "--no-drive" ] && shift  # the seed driver is gone (bench/gpu/README.md: the seed benchmark)
  # Pieces of a carried study (.study/, git-ignored) may come over several calls: keep each.
  if ls .study/* > /dev/null 2>&1; then
    mkdir -p "$S/carried" && for f in .study/*; do [ -f "$S/carried/$(basename "$f")" ] || cp "$f" "$S/carried/"; done
    echo "study pieces here: $(ls "$S/carried" | tr '\n' ' ')"
  fi
  if [ -f "$S/MANIFEST" ] && [ ! -f "$S/vllm.ok" ]; then
    . "$S/MANIFEST"
    have=$(ls "$S"/rest.tar.[0-9][0-9][0-9] 2>/dev/null | wc -l)
    echo "parts: $have of $parts"
    if [ "$have" -eq "$parts" ]; then
      cat "$S"/rest.tar.[0-9][0-9][0-9] > "$S/rest.tar"
      if [ "$(sha256sum "$S/rest.tar" | cut -d' ' -f1)" != "$rest_sha256" ]; then
        echo "rest.tar checksum MISMATCH" | tee "$S/vllm.failed"; return 1
      fi
      rm -f "$S"/rest.tar.[0-9][0-9][0-9]
      mkdir -p "$S/rest" && tar -C "$S/rest" -xf "$S/rest.tar" && rm -f "$S/rest.tar"
      if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-vllm \
          "$S"/early/common/*.whl "$S"/rest/bnb/*.whl "$S"/rest/plugin/*.whl "$S"/rest/vllm/*.whl >> "$S/stage.log" 2>&1 \
        && bash plugins/vllm_gemma4_compat/install.sh --target /tmp/site-vllm >> "$S/stage.log" 2>&1 \
        && PYTHONPATH=/tmp/site-vllm python3 -c "import vllm, bitsandbytes, compressed_tensors, sys; print('vllm', vllm.__version__, 'bitsandbytes', bitsandbytes.__version__, 'compressed-tensors', compressed_tensors.__version__, 'gemma4 shim', any(type(h).__name__ == 'Gemma4ConfigHook' for h in sys.meta_path))" 2>&1 | tail -3; then
        touch "$S/vllm.ok"
      else
        tail -20 "$S/stage.log" | tee "$S/vllm.failed"
      fi
      # The orchestrator's own packages, for `product`: only what neither the image nor the vLLM set
      # has, so the orchestrator runs on both targets (MLflow needs the set's opentelemetry).
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-orch \
          "$S"/early/common/*.whl "$S"/rest/orch/*.whl >> "$S/stage.log" 2>&1 \
        && PYTHONPATH=/tmp/site-orch:/tmp/site-vllm python3 -c "import optuna, mlflow; print('optuna', optuna.__version__, 'mlflow', mlflow.__version__)" 2>&1 | tail -3
    fi
  fi
  echo "== stage call took $((SECONDS - t0)) s; disk: $(df -h /tmp | tail -1 | awk '{print $4}') free"
  [ -f "$OUTDIR/driver.log" ] && { echo "== driver.log (tail)"; tail -8 "$OUTDIR/driver.log"; }
  [ -f "$OUTDIR/compress.log" ] && { echo "== compress.log (tail)"; grep -v "it/s]\|s/it]" "$OUTDIR/compress.log" | tail -4; }
  collect
}

wait_for() {
  local limit=${1:-540} t0=$SECONDS last=0 log="$OUTDIR/driver.log" seen
  [ -f "$OUTDIR/product.log" ] && log="$OUTDIR/product.log"
  [ -f "$OUTDIR/client.log" ] && [ "$OUTDIR/client.log" -nt "$log" ] && log="$OUTDIR/client.log"
  # Only the lines an earlier `wait` has not printed: the reply shows the last 12,000 characters.
  seen="$S/seen-$(basename "$log")"
  [ -f "$seen" ] && [ "$(stat -c %Y "$seen")" -ge "$(stat -c %Y "$S/driver.pid" 2>/dev/null || echo 0)" ] && last=$(cat "$seen")
  while :; do
    n=$( [ -f "$log" ] && wc -l < "$log" || echo 0)
    if [ "$n" -gt "$last" ]; then sed -n "$((last + 1)),${n}p" "$log" | grep -v "^\s*$" | cut -c1-400; last=$n; fi
    driver_running && [ $((SECONDS - t0)) -lt "$limit" ] || break
    sleep 5
  done
  echo "$last" > "$seen"
  driver_running && echo "== still running after ${limit} s" || echo "== benchmark ended"
  grep -v "it/s]\|s/it]" "$OUTDIR/compress.log" 2>/dev/null | grep "\[compress\]\|Error\|error" | tail -12
  [ -f "$OUTDIR/results.md" ] && { echo "== results.md"; cat "$OUTDIR/results.md"; }
  nvidia-smi --query-gpu=memory.used,power.draw,temperature.gpu --format=csv,noheader
  collect
}

restore_study() {  # what earlier machines carried ($S/carried/): vLLM's compile cache, a study's stores and baseline
  [ -f /tmp/product/optuna.db ] && return 0
  # Pieces of at most 15 MB (what $OUT brings back a file), joined again. A new study on the same
  # architecture hits an earlier study's compiles too (a ~70 s bf16 start, not ~149 s cold; H100, 2026-12-07).
  mkdir -p /tmp/product/cache
  ls "$S"/carried/compile-cache.tgz* > /dev/null 2>&1 && cat "$S"/carried/compile-cache.tgz* | tar -xzf - -C /tmp/product/cache \
    && echo "restored a carried compile cache: $(du -sh /tmp/product/cache | cut -f1)"
  [ -f "$S/carried/product-study.tgz" ] || return 0
  tar -xzf "$S/carried/product-study.tgz" -C /tmp product || return 1
  ls "$S"/carried/baseline.tgz* > /dev/null 2>&1 && cat "$S"/carried/baseline.tgz* | tar -xzf - -C /tmp
  echo "restored the carried study: $(du -sh /tmp/product | cut -f1) ($(ls /tmp/product/studies/*/ | grep -c baseline-) baseline files)"
}

product() {  # TRIALS [run options...]: the product's own pipeline on the twin (issue 8)
  local trials=${1:-3}; shift || true
  local args=("$@") i
  for ((i = 0; i < ${#args[@]}; i++)); do [ "${args[i]}" = --study ] && echo "${args[i + 1]}" > "$S/study"; done
  [ -f "$S/vllm.ok" ] || { echo "stage every part first (no $S/vllm.ok)"; return 1; }
  restore_study
  rm -rf "$CODE" && mkdir -p "$CODE/bench" && cp -r search objectives spaces "$CODE/" && cp -r bench/gpu "$CODE/bench/"
  # Interpreters of the two environments, as --serve-python / --compress-python expect them.
  printf '#!/bin/sh\nPYTHONPATH=/tmp/site-vllm:%s exec python3 "$@"\n' "$CODE" > /tmp/py-serve
  printf '#!/bin/sh\nPYTHONPATH=/tmp/site-llmc:%s exec python3 "$@"\n' "$CODE" > /tmp/py-compress
  chmod +x /tmp/py-serve /tmp/py-compress
  [ -f /tmp/bench/base/BUILD_OK ] || (cd "$CODE" && PYTHONPATH="/tmp/site-llmc:$CODE" python3 -m search make-twin \
    --out /tmp/bench/base) >> "$OUTDIR/compress.log" 2>&1 || { echo "twin build failed"; tail -5 "$OUTDIR/compress.log"; return 1; }
  # A random-weight twin answers nothing right: quality is fidelity to its bf16 self, output length fixed
  # and the request-level length knobs pinned (on a twin they only cut tokens); a later --set wins.
  # Not in a ( subshell ): there setsid would fork, and the pid file would name a process that is gone.
  # One GPU: `search run` bound to it. Several: `search run --gpus all`, the product's own fan-out (a
  # worker per GPU, each bound to its GPU, its NVML meter reading that GPU only; their logs in
  # /tmp/product/studies/STUDY/workers/), all on the one SQLite study.
  local gpus fan=(); gpus=$(nvidia-smi -L | wc -l)
  [ "$gpus" -gt 1 ] && fan=(--gpus all)
  cd "$CODE" || return 1
  setsid nohup env PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site-orch:/tmp/site-vllm:$CODE" VLLM_USE_FLASHINFER_SAMPLER=0 \
    CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES="$(seq -s, 0 $((gpus - 1)))" \
    python3 -m search run "${fan[@]}" --trials "$trials" --model /tmp/bench/base --space spaces/gemma4-e4b-gpu.yaml \
    --home /tmp/product --serve-python /tmp/py-serve --compress-python /tmp/py-compress \
    --set workload.quality=fidelity --set workload.ignore_eos=true --set workload.max_tokens=256 \
    --set workload.verbosity=model --set workload.thinking=false "$@" > "$OUTDIR/product.log" 2>&1 < /dev/null &
  echo $! > "$S/driver.pid"
  cd "$OLDPWD" || return 1
  echo "product run started on $gpus GPU(s) (run pid $(cat "$S/driver.pid")): --trials $trials $*; follow it with: wait SECONDS"
}

# Issue 25's study: the L4 space on the full-size twin, the seeds first, grown across machines. Its
# options are fixed here, so that every session resumes the same study (a changed option is refused).
# l4-twin (2026-12-06, 5 trials) sent 64 distinct prompts 8 times each: seeds with prefix caching on hit
# it for 86% of their prompt tokens, which no evaluation would; l4-twin-v2 sends 512 distinct prompts.
# l4-twin-v3: v2's twin fingerprinted its build timings, so no later rebuild could resume it (2026-12-07).
# l4-twin-v4: v3's 13 trials carried (`search widen`, 2026-12-07) into the L4 space widened to max_num_seqs 512
# and 1024, which the best seed runs and v3 could never sample; v4's stores hold v3's too.
# On a twin the fidelity score gates nothing (gate 0): 16 teacher-forced items record it for less.
# --no-early-stop: issue 25 asks for >= 30 measured trials, whatever the stop rule would say.
# The card kind names the study: an H100's joules and an H200's are not one study's (the product
# refuses a study resumed on another card); each kind's study grows on the sessions that get that kind.
card_kind() { nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -oE 'H100|H200|A100|L40S|L4' | head -1 | tr 'A-Z' 'a-z'; }
L4_STUDY=(--study "l4-twin-v4-$(card_kind)" --space spaces/gemma4-e4b-l4.yaml --warm-start seeds --gate 0 --trial-timeout 900
          --set serve.attention_backend=TRITON_ATTN --set workload.fidelity_items=16 --no-early-stop)

l4study() {  # TRIALS [RESULTS_DIR]: resume (or begin) issue 25's study from the stores a committed results
  # folder holds (they travel with the tree) and the compile cache .study/ carried; no folder: begin it
  if [ -n "${2:-}" ]; then
    mkdir -p "$S/carried" && cp "$2"/product-study.tgz "$2"/baseline.tgz* "$S/carried/" || return 1
  fi
  # RUN_TIMEOUT=S: `search run --timeout S`, no trial started that would end after S (the lease's end)
  product "${1:-30}" "${L4_STUDY[@]}" ${RUN_TIMEOUT:+--timeout "$RUN_TIMEOUT"}
}

l4again() {  # TRIALS [RESULTS_DIR]: l4study resumed once with the reference enqueued again and served again
  # (reference-again.yaml): the NVML evidence that a trial identical to the reference reproduces its price
  L4_STUDY+=(--warm-start bench/gpu/reference-again.yaml --repeat-measured)  # argparse: the later --warm-start wins
  l4study "$@"
}

twin() {  # the twin's build in the background (compression env), while the other parts arrive
  [ -f "$S/llmc.ok" ] || { echo "stage p00 first"; return 1; }
  [ -f /tmp/bench/base/BUILD_OK ] && { echo "twin already built"; return 0; }
  local code=/tmp/twin-code  # its own copy: product replaces $CODE
  rm -rf "$code" && mkdir -p "$code/bench" && cp -r search objectives spaces "$code/" && cp -r bench/gpu "$code/bench/"
  cd "$code" || return 1  # python -m puts the current folder first: the copy's, not the working tree's
  setsid nohup env PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site-llmc:$code" python3 -m search make-twin \
    --out /tmp/bench/base > "$OUTDIR/twin-build.log" 2>&1 < /dev/null &
  echo "twin build started (pid $!)"
  cd "$OLDPWD" || return 1
}

client() {  # TRIAL [client_replay.py options]: vLLM's own client on a finished trial (issue 25 item 1)
  local trial=${1:?usage: client TRIAL_NUMBER [client_replay.py options]}; shift
  [ -f "$S/vllm.ok" ] || { echo "stage every part first (no $S/vllm.ok)"; return 1; }
  driver_running && { echo "a run is going on (pid $(cat "$S/driver.pid")): wait for it first"; return 1; }
  restore_study
  [ -f /tmp/product/optuna.db ] || { echo "no study under /tmp/product (run product or l4study, or carry .study/)"; return 1; }
  [ -f /tmp/bench/base/BUILD_OK ] || { echo "no twin at /tmp/bench/base: run the twin verb first, then client"; return 1; }
  rm -rf "$CODE" && mkdir -p "$CODE/bench" && cp -r search objectives spaces "$CODE/" && cp -r bench/gpu "$CODE/bench/" \
    && cp bench/client_replay.py "$CODE/bench/"
  printf '#!/bin/sh\nPYTHONPATH=/tmp/site-vllm:%s exec python3 "$@"\n' "$CODE" > /tmp/py-serve
  printf '#!/bin/sh\nPYTHONPATH=/tmp/site-llmc:%s exec python3 "$@"\n' "$CODE" > /tmp/py-compress
  chmod +x /tmp/py-serve /tmp/py-compress
  local study; study=$(cat "$S/study" 2>/dev/null || echo "${L4_STUDY[1]}")
  # Not in a ( subshell ), and from the copy: see product().
  cd "$CODE" || return 1
  setsid nohup env PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site-orch:/tmp/site-vllm:$CODE" CUDA_DEVICE_ORDER=PCI_BUS_ID \
    CUDA_VISIBLE_DEVICES=0 python3 bench/client_replay.py --home /tmp/product --study "$study" --trial "$trial" \
    --serve-python /tmp/py-serve --compress-python /tmp/py-compress --workdir /tmp/client-replay \
    --out "$OUTDIR/client-replay.json" "$@" > "$OUTDIR/client.log" 2>&1 < /dev/null &
  echo $! > "$S/driver.pid"
  cd "$OLDPWD" || return 1
  echo "client replay of trial $trial of study $study started (pid $(cat "$S/driver.pid")); follow it with: wait SECONDS"
}

cmd=${1:-stage}; shift || true
case "$cmd" in
  stage) stage "$@" ;;
  product) product "$@" ;;
  l4study) l4study "$@" ;;
  l4again) l4again "$@" ;;
  twin) twin "$@" ;;
  client) client "$@" ;;
  wait) wait_for "$@" ;;
  stop) stop ;;
  cache) bring_cache "$@" ;;
  *) echo "usage: $0 stage [--no-drive] | twin | product [TRIALS [run options]] | l4study|l4again [TRIALS [RESULTS_DIR]] | client TRIAL | wait SECONDS | stop | cache GROUP"; exit 2 ;;
esac
