# Two commands do everything on a fresh machine: `make test` and `make demo`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEV    := $(VENV)/.installed-dev

.PHONY: venv test demo serve serve-flickr8k serve-photos bench clean flickr8k flickr8k-export

venv: $(STAMP)

# torch first, pinned to the local CPU wheel: asking pip for plain `torch`
# would fetch a multi-GB CUDA build. Re-runs only when pyproject.toml changes.
# What the demo, the service and the benchmark use; `make test` adds the [dev] tools
# (pytest, Ray, Playwright, the reference runtimes: the demo needs none of them).
# pip byte-compiles every file it installs (torch's thousands), which was a third of the venv's
# time; --no-compile, then one process imports what the commands use with bytecode writing on
# (even where PYTHONDONTWRITEBYTECODE is set), so only that is compiled, once.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile torch==2.13.0 -e '.[serve,report,efficientnet]'
	$(call compile_imports,$(WARM))
	touch $(STAMP)

WARM      := fnemm_studies.demo fnemm_studies.study fnemm.cli.runs fnemm.cli.results fnemm.cli.search fnemm.cli.features \
             fnemm.cli.studies fnemm.search.service fnemm.features.cnn.tflite tflite torch._dynamo matplotlib.pyplot \
             matplotlib.backends.backend_agg PIL.features PIL.JpegImagePlugin PIL.PngImagePlugin PIL.BmpImagePlugin \
             PIL.GifImagePlugin PIL.PpmImagePlugin torch.utils.serialization torch.profiler._cupti_monitor
WARM_DEV  := torch.distributed torch.nn.parallel torch.multiprocessing torch.testing torch.profiler
compile_imports = env -u PYTHONDONTWRITEBYTECODE $(PY) -c 'import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]' $(1)

$(DEV): $(STAMP)
	$(PY) -m pip install -q -e '.[dev]'
	$(call compile_imports,$(WARM_DEV))
	touch $(DEV)

# TEST_JOBS pytest processes, a test file each at a time (its module fixtures stay in one
# process); 2 fits the 2-core CI machine. TEST_JOBS=0 runs everything in this process.
TEST_JOBS ?= 2
test: $(DEV)
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadfile)

# The whole method on the bundled Flickr8K photos (../shared/data), then a search.
# Re-running reuses every finished stage. SEEDS=3 trains three runs per model.
# The closing search uses FNE-late-MH, the FNE recipe the study recommends (README: When the FNE helps).
SEEDS ?= 1
demo: $(STAMP)
	$(VENV)/bin/fnemm demo --out runs/demo --seeds $(SEEDS)
	$(VENV)/bin/fnemm search --checkpoint runs/demo/FNE-late-MH/seed-0 --features runs/demo/features-late \
		--dataset flickr8k-1k --split test --text "a dog runs on the beach"

# After `make demo`: index the demo's photos and their captions with its best model (by the
# report's test rsum; MODEL=FNE-MH, FC7-MH, FNE-POE or FNE-late-MH for another) and serve them on
# http://127.0.0.1:$(PORT)/. SPLIT=test: only the 125 held-out test photos, which no model was
# trained on (default: all 991). The index is rebuilt only when the checkpoint or store changed.
MODEL ?= $(shell test -x $(PY) && $(PY) -c "from fnemm_studies.demo import best_model; print(best_model())" 2>/dev/null || echo FNE-late-MH)
# the features MODEL was trained on (FNE-late-MH: the late layers' store the demo derives)
STORE = runs/demo/$(if $(filter FNE-late-MH,$(MODEL)),features-late,features)
PORT  ?= 8000
SPLIT ?= all
serve: $(STAMP)
	@test -f runs/demo/$(MODEL)/seed-0/best.pt || { echo "runs/demo/$(MODEL): run \`make demo\` first"; exit 2; }
	$(VENV)/bin/fnemm index build --checkpoint runs/demo/$(MODEL)/seed-0 --features $(STORE) \
		--dataset flickr8k-1k --split $(SPLIT) --out runs/demo/index-$(MODEL)-$(SPLIT)
	$(VENV)/bin/fnemm serve --index runs/demo/index-$(MODEL)-$(SPLIT) --port $(PORT)

# After `make flickr8k` (or part of it): all 8,091 Flickr8K photos and their 40,455 captions,
# searched with the benchmark's best model (SPLIT=test: its 1,000 test photos). The benchmark's
# stores hold the 8,000 photos of the official lists; the 91 others are extracted on the way.
serve-flickr8k: $(STAMP)
	run=$$($(PY) -m fnemm_studies.pick flickr8k "$(F8K_OUT)") && \
	photos=$$($(PY) -c "from fnemm.datasets import load_dataset; print(load_dataset('flickr8k-224-all').images)") && \
	set -- $$run && $(VENV)/bin/fnemm index build --checkpoint $$1 --features $$2 --dataset flickr8k-224-all \
		$(if $(filter all,$(SPLIT)),--images "$$photos") \
		--split $(SPLIT) --out $(F8K_OUT)/index-best-$(SPLIT) && \
	$(VENV)/bin/fnemm serve --index $(F8K_OUT)/index-best-$(SPLIT) --port $(PORT)

# Your own photos, no captions needed: `make serve-photos DIR=~/Pictures` indexes DIR (folder,
# recursive, or a list file) with the Flickr8K benchmark's best model when F8K_OUT has one, else the
# demo's best (MODEL_RUN=RUN for another), and serves it. Re-running reuses the finished extraction.
serve-photos: $(STAMP)
	@test -n "$(DIR)" || { echo "make serve-photos DIR=FOLDER: the photos to search (a folder or a list file)"; exit 2; }
	run=$${MODEL_RUN:-$$($(PY) -m fnemm_studies.pick photos "$(F8K_OUT)")} && \
	out=runs/photos/$$(basename "$(DIR)") && \
	$(VENV)/bin/fnemm index build --checkpoint "$$run" --images "$(DIR)" --out "$$out" && \
	$(VENV)/bin/fnemm serve --index "$$out" --port $(PORT)

# The paper's Flickr8K benchmark (README: The paper's Flickr8K benchmark): all 8,091 photos
# (flickr8k-224), the paper's flickr8k/ presets stopped by validation patience, 2 CNNs x 4 feature
# recipes x 3 seeds, and a learning curve. Days on 2 CPU cores; resumable (run it again to
# continue); JOBS processes share the grid; DEVICE=cuda on a GPU. Ends with F8K_OUT/study.md.
F8K_OUT ?= runs/flickr8k
JOBS    ?= 2
DEVICE  ?= cpu
THREADS ?= $(shell n=$$(( $$(nproc) / $(JOBS) )); [ $$n -ge 1 ] && echo $$n || echo 1)
F8K_STUDY = $(VENV)/bin/fnemm study --dataset flickr8k-224 --presets flickr8k --patience 10 --splits 1 \
	--seeds 3 --cnns efficientnet_lite0,mobilenet_v2 --variants baseline,fne,late-center-layer,fne+baseline \
	--train-sizes 1000,2000,4000 --curve-variants baseline,fne,late-center-layer \
	--curve-cnns efficientnet_lite0 --curve-seeds 2 --out $(F8K_OUT) --device $(DEVICE) --threads $(THREADS)
# CARRY=results/flickr8k-224: on a new machine, the committed runs' records first (only what is left trains)
CARRY   ?=
flickr8k: $(STAMP)
	mkdir -p $(F8K_OUT)
	for k in $$(seq 2 $(JOBS)); do $(F8K_STUDY) $(if $(CARRY),--carry $(CARRY)) > $(F8K_OUT)/worker-$$k.log 2>&1 & done; \
	$(F8K_STUDY) $(if $(CARRY),--carry $(CARRY)); status=$$?; wait; exit $$status

# After runs finish: their records (no weights) into results/flickr8k-224, and README's tables
# redrawn from them (then `git add results README.md`).
flickr8k-export: $(STAMP)
	$(F8K_STUDY) --report-only --export results/flickr8k-224
	$(PY) -m fnemm_studies.readme_table results/flickr8k-224 README.md

bench: $(STAMP)
	$(PY) bench/eval_speed.py
	$(PY) bench/train_speed.py
	$(PY) bench/extract_speed.py
	$(PY) bench/search_speed.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
