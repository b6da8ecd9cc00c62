#!/usr/bin/env bash
# Measures what the Perl greydaemon holds per grey triplet: a Perl hash of
# the same 1,000,000 keys that `greyload fill` sends (lowercased
# "ip sender recipient", the Perl daemon's %grey key) mapped to a time, as
# the Perl daemon stores them. Prints the growth of resident memory per key.
#
#   bash scripts/perl-memory.sh [n]
set -euo pipefail
n=${1:-1000000}
perl -e '
  sub rss { open my $f, "<", "/proc/self/status" or die; while (<$f>) { return $1 * 1024 if /^VmRSS:\s+(\d+)/ } }
  my $n = shift; my %grey; my $before = rss(); my $now = time;
  for my $i (0 .. $n - 1) {
    my $ip = sprintf "172.%d.%d.%d", 16 + ($i >> 16 & 15), $i >> 8 & 255, $i & 255;
    $grey{lc "$ip fill\@sender.example f$i-1\@rcpt.example"} = $now;
  }
  my $grown = rss() - $before;
  printf "perl: %d triplets, resident memory grew %.1f MB: %.0f bytes per triplet\n", $n, $grown / 1e6, $grown / $n;
' "$n"
