# Makefile for whatsapp_proxy: one C file, no autotools.
# `make` builds, `make run` runs with the reference's ports, `make test` tests.
# `make`, `make run`, `make test` and `make install` first run the dependency
# check (scripts/check-deps.sh): as root it installs what is missing.

CC      ?= cc
# CFLAGS is yours to change (make CFLAGS="-O0 -g"); the flags the code needs
# are added in ALL_CFLAGS: -std=c11 for atomics, _GNU_SOURCE for accept4(),
# epoll and memmem() (Linux), and every warning as an error.
CFLAGS  ?= -O2 -g
ALL_CFLAGS = -std=c11 -D_GNU_SOURCE -Wall -Wextra -Werror -pthread $(CFLAGS) \
             $(shell pkg-config --cflags openssl 2>/dev/null)
LDLIBS   = $(shell pkg-config --libs openssl 2>/dev/null || echo -lssl -lcrypto) -pthread
CHECK_LIBS = $(shell pkg-config --libs check 2>/dev/null || echo -lcheck)
ARGS    ?=
# `make install` puts files under $(DESTDIR)$(PREFIX); the unit goes to
# $(DESTDIR)$(UNITDIR), the options file to $(DESTDIR)$(DEFAULTDIR).
PREFIX  ?= /usr/local
UNITDIR ?= /etc/systemd/system
DEFAULTDIR ?= /etc/default

# `make`: check the dependencies, then build.
all: deps whatsapp_proxy

# The proxy itself.
whatsapp_proxy: whatsapp_proxy.c whatsapp_proxy.h
	$(CC) $(ALL_CFLAGS) -o $@ whatsapp_proxy.c $(LDLIBS)

# The tests link the same file, with its main() renamed so the tests have theirs.
test_proxy: test_proxy.c whatsapp_proxy.c whatsapp_proxy.h
	$(CC) $(ALL_CFLAGS) -Dmain=whatsapp_proxy_main -c -o whatsapp_proxy_for_tests.o whatsapp_proxy.c
	$(CC) $(ALL_CFLAGS) -o $@ test_proxy.c whatsapp_proxy_for_tests.o $(CHECK_LIBS) $(LDLIBS)

# The demo upstream of the workshop (demo/), linked with the proxy's own
# PROXY header decoder.
demo/demo_upstream: demo/demo_upstream.c whatsapp_proxy.c whatsapp_proxy.h
	$(CC) $(ALL_CFLAGS) -Dmain=whatsapp_proxy_main -c -o demo/whatsapp_proxy_for_demo.o whatsapp_proxy.c
	$(CC) $(ALL_CFLAGS) -o $@ demo/demo_upstream.c demo/whatsapp_proxy_for_demo.o $(LDLIBS)

# Runs the proxy in front of the demo upstream, all on 127.0.0.1, offline.
demo: deps whatsapp_proxy demo/demo_upstream
	sh demo/run.sh $(ARGS)

# Installs (as root) or names the packages a fresh Debian or Ubuntu machine
# lacks; prints nothing when nothing is missing.
deps:
	@sh scripts/check-deps.sh

# Runs the proxy in the foreground with the default ports; add flags with ARGS="...".
run: deps whatsapp_proxy
	./whatsapp_proxy $(ARGS)

# Runs the Check suite; CK_RUN_CASE="PROXY protocol" make test runs one section.
# First it checks that every name tutorial.md uses still exists in the code.
test: deps whatsapp_proxy test_proxy
	@out=$$(sh scripts/check-tutorial.sh --names) || { echo "$$out"; exit 1; }; \
	echo "tutorial.md names: $$(echo "$$out" | tail -n 1)"
	./test_proxy

# Runs tutorial.md's checkpoints against the demo (needs nc, curl, openssl).
tutorial-check: whatsapp_proxy demo/demo_upstream
	sh scripts/check-tutorial.sh

# The same suite under AddressSanitizer + UndefinedBehaviorSanitizer, under
# ThreadSanitizer (data races), and under valgrind (leaks, bad reads).
# Each rebuilds from scratch with its own flags, and cleans up after itself
# (pass or fail), so that a later `make run` never starts a sanitizer build.
test-asan: deps
	$(MAKE) clean
	$(MAKE) CC=clang CFLAGS="-O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all" test; \
	status=$$?; $(MAKE) clean; exit $$status
test-tsan: deps
	$(MAKE) clean
	$(MAKE) CC=clang CFLAGS="-O1 -g -fsanitize=thread" test; \
	status=$$?; $(MAKE) clean; exit $$status
valgrind: deps
	$(MAKE) clean
	$(MAKE) CFLAGS="-O1 -g" whatsapp_proxy test_proxy
	CK_FORK=no TEST_BULK_MIB=8 TEST_TIME_SCALE=5 valgrind --leak-check=full --errors-for-leak-kinds=definite,indirect --error-exitcode=9 --trace-children=no --max-threads=3000 ./test_proxy; \
	status=$$?; $(MAKE) clean; exit $$status

# Fuzzes the parsers with libFuzzer for FUZZ_SECONDS each (fuzz/README.md).
FUZZ_SECONDS ?= 60
fuzz: deps
	$(MAKE) -C fuzz run FUZZ_SECONDS=$(FUZZ_SECONDS)

# Real peers (HAProxy, curl, openssl s_client), scale-out behind a balancer,
# and a soak run: scripts in tests/ (tests/README.md). test-peers runs
# peers.sh, then the differential test beside HAProxy, then the comparison
# with nginx (does the proxy look like a web server?), always all three;
# it fails if any fails.
test-peers: whatsapp_proxy
	sh tests/peers.sh; peers=$$?; \
	sh tests/differential.sh; differential=$$?; \
	sh tests/lookalike.sh; lookalike=$$?; \
	[ $$peers -eq 0 ] && [ $$differential -eq 0 ] && [ $$lookalike -eq 0 ]
SOAK_SECONDS ?= 60
soak: whatsapp_proxy
	sh tests/soak.sh $(SOAK_SECONDS)

# Memory per stalled slow reader beside HAProxy, and survival under a 160 MiB data limit.
test-memory: whatsapp_proxy
	sh tests/slow_readers.sh

# Measures whatsapp_proxy beside HAProxy on loopback (bench/README.md).
bench: whatsapp_proxy
	$(MAKE) -C bench run
bench-quick: whatsapp_proxy
	$(MAKE) -C bench quick

# Writes a self-signed chain into certs/, like the reference's generate-certs.sh.
certs:
	sh certs/generate-certs.sh certs

# Shell lines that tell a user who is not root how to run `make $(1)` as
# root: with sudo where there is one, else with su.
how_to_run_as_root = \
	if command -v sudo >/dev/null 2>&1; then \
	    echo "Run: sudo make $(1)"; \
	    echo "(if you may not use sudo: become root with su -, go back to this folder with cd $(CURDIR), then run: make $(1))"; \
	else \
	    echo "There is no sudo here: become root with su -, go back to this folder with cd $(CURDIR), then run: make $(1)"; \
	fi

# Installs the binary, the systemd unit and (if absent) its options file. An
# options file already there is kept, with the changes you made to it.
install: deps whatsapp_proxy
	@for dir in $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(UNITDIR) $(DESTDIR)$(DEFAULTDIR); do \
	    while [ ! -e "$$dir" ]; do dir=$$(dirname "$$dir"); done; \
	    [ -w "$$dir" ] || { echo "make install writes into $$dir, so it needs root."; \
	        $(call how_to_run_as_root,install); \
	        exit 1; }; \
	done
	install -D -m 0755 whatsapp_proxy $(DESTDIR)$(PREFIX)/bin/whatsapp_proxy
	install -d $(DESTDIR)$(UNITDIR)
	sed 's|@BINDIR@|$(PREFIX)/bin|' contrib/whatsapp_proxy.service > $(DESTDIR)$(UNITDIR)/whatsapp_proxy.service
	@if [ -e $(DESTDIR)$(DEFAULTDIR)/whatsapp_proxy ]; then \
	    echo "kept $(DESTDIR)$(DEFAULTDIR)/whatsapp_proxy as it is (compare it with contrib/whatsapp_proxy.default)"; \
	else \
	    echo "install -D -m 0644 contrib/whatsapp_proxy.default $(DESTDIR)$(DEFAULTDIR)/whatsapp_proxy"; \
	    install -D -m 0644 contrib/whatsapp_proxy.default $(DESTDIR)$(DEFAULTDIR)/whatsapp_proxy; \
	fi
	@echo "Next, as root: systemctl daemon-reload, then systemctl enable --now whatsapp_proxy"
	@echo "(after an update: systemctl daemon-reload, then systemctl restart whatsapp_proxy)"

# Lets ./whatsapp_proxy use ports below 1024 without running as root (needs
# root once). Every build writes a new file without that right, so run
# `make setcap` again after each rebuild.
setcap: deps whatsapp_proxy
	@if [ "$$(id -u)" != 0 ]; then \
	    echo "make setcap needs root."; \
	    $(call how_to_run_as_root,setcap); \
	    exit 1; \
	fi
	@PATH="$$PATH:/usr/sbin:/sbin"; \
	command -v setcap >/dev/null 2>&1 || { echo "setcap is missing; install it with: apt-get install -y libcap2-bin"; exit 1; }; \
	echo "setcap cap_net_bind_service=+ep whatsapp_proxy"; \
	setcap cap_net_bind_service=+ep whatsapp_proxy
	@echo "Done: ./whatsapp_proxy may now use ports below 1024 without root."
	@echo "A rebuild (make) takes this right away again: run make setcap, as root, after each one."

# Prints what to tell users: the share link and, when qrencode is installed,
# its QR code, for a phone to scan from the screen. Give the proxy's options
# and your server's name:
#   make qr ARGS="--listen 443/tls --listen 587/media --public-host proxy.example.org"
qr: deps whatsapp_proxy
	@echo "./whatsapp_proxy --check $(ARGS)"
	@./whatsapp_proxy --check $(ARGS); status=$$?; sh scripts/check-deps.sh qr; exit $$status

.PHONY: setcap qr

clean:
	rm -f whatsapp_proxy test_proxy *.o demo/demo_upstream demo/*.o

.PHONY: all deps demo run test tutorial-check test-asan test-tsan valgrind fuzz test-peers soak test-memory bench bench-quick certs install clean
