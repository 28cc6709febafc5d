#!/usr/bin/env bash
# Break the model on purpose and check that the learning tests notice (issues 8 and 15).
# Each mutation is applied to a copy of the tree; the script prints which tests fail under it.
#   bench/mutations.sh            # all mutations (a few minutes each on 2 cores)
#   bench/mutations.sh uniform_slice_attention
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
declare -A FILE EXPR
FILE[uniform_slice_attention]=pipeline/heads/slice_attention.py
EXPR[uniform_slice_attention]='s|w = torch.softmax(self.mapping(y).squeeze(-1), dim=-1)|w = torch.full_like(self.mapping(y).squeeze(-1), 1.0 / y.shape[1])|'
FILE[aps_first_slices]=pipeline/heads/drct2.py
EXPR[aps_first_slices]='s|chosen = torch.topk(score, m_key, dim=1).indices|chosen = torch.arange(m_key, device=score.device).expand(score.shape[0], -1)|'
FILE[aps_primary_resolution]=pipeline/training/dataset.py
EXPR[aps_primary_resolution]='s|return self.aps_features\[torch.gather(rows, 1, aps_idx)\].float()|return self.primary_features[torch.gather(rows, 1, aps_idx)].float()|'
FILE[no_feature_attention]=pipeline/heads/feature_attention.py
EXPR[no_feature_attention]='s|w = torch.softmax(z if self.score is None else self.score(z), dim=-1)|w = torch.full_like(z, 1.0 / z.shape[-1])|'
FILE[aps_reads_all_m]=pipeline/heads/drct2.py
EXPR[aps_reads_all_m]='s|a = self.aps(gather_aps(aps_source, aps_idx), context)|a = self.aps(gather_aps(aps_source, torch.arange(z.shape[1], device=z.device).expand(z.shape[0], -1)), context)|'
FILE[leak_validation_statistics]=pipeline/training/trainer.py
EXPR[leak_validation_statistics]='s|set_input_statistics(model, data, train_scans)|set_input_statistics(model, data, labelled)|'
FILE[no_eq3]=pipeline/heads/feature_attention.py
EXPR[no_eq3]='s|return z \* w \* self.scale, w|return z, w|'
FAMILY=${DRCT_PLANTED_FAMILY:-$ROOT/../shared/benchmarks/planted_family.py}
TESTS=${TESTS:-tests/test_learning.py tests/test_family.py tests/test_heads.py}
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(uniform_slice_attention aps_first_slices aps_primary_resolution no_feature_attention
                                 aps_reads_all_m leak_validation_statistics no_eq3)
for name in "${names[@]}"; do
  work=$(mktemp -d)
  cp -r pipeline stages cache configs tests pyproject.toml "$work"/
  sed -i "${EXPR[$name]}" "$work/${FILE[$name]}"
  if cmp -s "$ROOT/${FILE[$name]}" "$work/${FILE[$name]}"; then
    echo "$name: the mutation did not apply (code changed?)"; rm -rf "$work"; continue
  fi
  failed=$(cd "$work" && DRCT_PLANTED_FAMILY=$FAMILY PYTHONPATH=$work "$PY" -m pytest -q -p no:cacheprovider $TESTS 2>&1 \
           | grep -E '^FAILED' | sed 's/ - .*//; s/FAILED tests\///' | tr '\n' ' ')
  echo "$name: failing tests: ${failed:-NONE (the tests do not guard this)}"
  rm -rf "$work"
done
