#!/usr/bin/env bash
# Exp3 — exp1 with only 2 particles from the start: is pruning (exp2) better than simply starting with 2?
# SPEC §6.  Usage: bash commands_gpu/exp3_2particle.sh --1|--10|--90 [...]   (DRY_RUN=1, GPU=<id>, MODEL=toy: see _common.sh)
set -euo pipefail

EXP=exp3_2particle
EXP_SHORT=exp3
RUN_TAG=scale10_2particles
EXP_DESCRIPTION="Exp3 — exp1 with only 2 particles from the start: is pruning (exp2) better than simply starting with 2?"

# --- settings: each once, all passed on the command line (recorded in config.yaml) ---------
SEED=42                      # the original study's seed; every (image, particle) stream derives from it
NUM_SAMPLES=2                # particles per image (2: same budget as exp2 after pruning, without the 4-particle start)
BATCH_SIZE=1                 # one image (its particles) per batch, as DAPS runs it
MCMC_ALGO=langevin           # the research runs use Langevin (SPEC §2)
MCMC_STEPS=100               # DAPS' LDM phase-retrieval Langevin default: 100 steps per annealing step
REPULSION_SCALE=10           # step-0 ratio ||λr||/||score|| ≈ 0.06 in the original study (0.1: no effect, 50: collapse)
REPULSION_SIGMA_BREAK=1.0    # repulsion only while σ ≥ 1.0 (steps 0-29): explore early, refine late
REPULSION_SCHEDULE=constant  # constant λ above the break, as in the original study
PRUNING_STEP=-1              # -1 = no pruning
PRUNING_KEEP=2               # survivors when pruning is on (4 → 2)
PRUNING_MODE=slicing         # survivors only: later steps really run on fewer particles (time/VRAM saving)
PRUNING_CRITERION=loss       # keep the lowest measurement loss (no ground truth needed)
HARD_DATA_CONSISTENCY=-1     # -1 = no end-of-loop optimisation
OPTIMIZATION_LR=5.0e-3       # AdamW lr of ReSample
OPTIMIZATION_EPS=1.0e-3      # stop a particle when its loss < eps²
OPTIMIZATION_MAX_ITERS=500   # ReSample's iteration cap

source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
exp_main "$@"
