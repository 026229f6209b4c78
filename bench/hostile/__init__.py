"""A well-behaved guest and the admin socket while hostile guests attack tmemd (issue #14).

    python -m bench.hostile [--quick] [--seconds S] [--attacks ring,unread,...] [--json FILE]

Each phase starts a fresh tmemd (bench/servers.py) with an admin socket, connects one honest guest
(tmemclient, 4 KiB pages in a persistent pool, every key put beforehand) and one admin prober,
fills the budget once and frees it (so later memory growth is not the metadata of stored pages),
then starts the phase's attackers as separate processes, waits until the attack is in full swing
and measures, at the same moment: the honest guest's single gets in a closed loop, ``status`` on
the admin socket in a paced loop, the daemon's memory (VmRSS, RssAnon), its CPU time and how long
it and the honest guest waited for a CPU. The first phase has no attacker (the baseline); every
later one runs one attack:

  ring          request rings (HELLO ring=16) kept full of PINGs, never sleeping (PROTOCOL.md §4.6)
  unread        64 connections pipelining cheap requests and never reading a reply, measured once
                the daemon has stopped reading all of them (its steady state)
  unread-onset  the same, measured from the moment the connections open until that steady state
                (while the daemon serves what they queued before it stopped reading)
  heavy         pipelined PUT_MANY of max_batch 64 KiB pages (an order-4 pool), fresh keys each
  mirror        a mapped and lending guest rewriting its mirror through a read-write re-open of
                /proc/self/fd/N and writing its loan file far beyond what it was lent
  flood         a greedy but legal guest: pipelined PINGs on the socket, every reply read

It prints one table (values and ratios to the baseline), checks issue #14's targets and writes
everything as JSON (default bench/results/hostile.json). Progress goes to stderr. Every process
and daemon it started is stopped on the way out, also on Ctrl-C, SIGTERM and errors; children
also die with it if it is killed outright. bench/README.md explains the measurements.

The modules, in the order a run uses them:

  __main__.py   the command line: options, the phases in turn, the table and the JSON
  phase.py      one phase: a fresh daemon, the warm-up, the attackers, the window, the recovery
  children.py   the forked child processes and their pipes to the orchestrator
  guests.py     the honest guest and the admin prober
  attacks.py    the attacks, by name, each run by an attacker process
  raw.py        RawGuest: the attackers' hand-spoken guest (handshake, non-blocking socket)
  measure.py    /proc readings of the daemon, its log, summaries of timed calls
  report.py     issue #14's targets, the table and the JSON file
"""
