#!/usr/bin/env bash
# Make every report that is computed from bench/results/h100.db again (CPU), after the DB
# changed (new profile runs, then `fit`): the measured GPU runs stay as they are, and their
# predictions are replayed on the DB.
#   bash bench/remake_reports.sh [VIDUR_VENV]
# VIDUR_VENV (default /tmp/vidur-venv): where bench/vidur_dropin.py keeps its Vidur install.
set -eu
DB=bench/results/h100.db
R=bench/results
python -m dooly_fx fit --db "$DB" | tail -1
python bench/ship_db.py --db "$DB"
python bench/validate_steps_report.py --db "$DB" | tail -2
python bench/validate_serving_report.py --db "$DB" | tail -1
python bench/validate_serving_report.py --db "$DB" --runs $R/serving/other_instance \
    --out $R/validate_serving_other_instance.json | tail -1
python bench/validate_serving_report.py --db "$DB" --runs $R/serving/gc \
    --out $R/validate_serving_gc.json | tail -1
python bench/serving_floor.py --db "$DB" | tail -1
python bench/db_fit.py | tail -1
python bench/profile_savings.py --db "$DB" | tail -1
python bench/families.py --db "$DB" | tail -2
python bench/families.py --db "$DB" --engine "paged|sdpa|bfloat16" \
    --out $R/families_paged.json | tail -2
python bench/host_speed.py | tail -1
python bench/host_noise.py | tail -1
python bench/serving_host_phases.py | tail -1
python bench/vidur_dropin.py --venv "${1:-/tmp/vidur-venv}" | tail -2
