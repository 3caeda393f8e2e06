#!/usr/bin/env bash
# The house's layers, bottom-up: core, upstream, state, runtime, ops, proxy, app. Run by
# `make lint` (and so by `make test`); it fails when
#   - a file under src/core/ names Pingora, tokio, a socket type or a module outside the core
#     (the core is pure);
#   - a file names a layer above its own (`crate::proxy` under src/runtime/, `crate::app` under
#     src/ops/, ...);
#   - the modules' `use` graph has a cycle. A module is a layer's file or folder
#     (`core::config`, `proxy::front_door`), its layer's `mod.rs` one more (`proxy::mod`); an edge
#     is any path one names to another: `crate::layer::module`, `super::module` or `super::Item`
#     from a layer's file, `module::` from its `mod.rs`.
set -euo pipefail
cd "$(dirname "$0")/.."

pattern='\bpingora|\btokio\b|\btokio::|TcpStream|TcpListener|UdpSocket|UnixStream|UnixListener|RawFd|crate::(app|ops|proxy|runtime|state|upstream)\b'
# Comments may speak of what the core is not; code may not name it.
if hits=$(grep -rnE "$pattern" src/core/ | grep -vE '^[^:]+:[0-9]+:\s*//'); then
  echo "src/core/ must stay pure (no Pingora, tokio, sockets or outer modules):" >&2
  echo "$hits" >&2
  exit 1
fi

perl - core upstream state runtime ops proxy app <<'PERL'
use strict;
use warnings;
my @layers = @ARGV;
my %rank;
@rank{@layers} = (0 .. $#layers);

# Modules of each layer: its files and folders (a folder is one module with its children).
my %modules;
for my $layer (@layers) {
    opendir(my $dh, "src/$layer") or die "src/$layer: $!";
    for (readdir $dh) {
        next if /^\./ || $_ eq 'mod.rs';
        (my $m = $_) =~ s/\.rs$//;
        $modules{$layer}{$m} = 1;
    }
}
sub node {
    my ($layer, $name) = @_;
    return exists $modules{$layer}{$name} ? "${layer}::$name" : "${layer}::mod";
}

# `use a::{b, c::{d, e}}` as the paths it names: a::b, a::c::d, a::c::e.
sub expand {
    my ($tree) = @_;
    $tree =~ s/\s+//g;
    return ($tree) unless $tree =~ /\{/;
    my ($head, $rest) = $tree =~ /^([^{]*)\{(.*)\}$/ or return ($tree);
    my ($depth, $part, @parts) = (0, '');
    for my $ch (split //, $rest) {
        $depth++ if $ch eq '{';
        $depth-- if $ch eq '}';
        if ($ch eq ',' && $depth == 0) { push @parts, $part; $part = ''; next; }
        $part .= $ch;
    }
    push @parts, $part if length $part;
    return map { expand("$head$_") } grep { length } @parts;
}

my (%edges, @violations);
my @files = split /\n/, `find src -name '*.rs' | sort`;
for my $file (@files) {
    my ($layer, $rest) = $file =~ m{^src/([a-z_]+)/(.+)$} or next;
    next unless exists $rank{$layer};
    my @segments = split m{/}, $rest;
    (my $first = $segments[0]) =~ s/\.rs$//;
    my $from = $first eq 'mod' ? "${layer}::mod" : "${layer}::$first";
    my $at_layer_level = @segments == 1;
    open(my $fh, '<', $file) or die "$file: $!";
    my $code = do { local $/; <$fh> };
    close $fh;
    $code =~ s{^\s*//.*$}{}mg;            # comment lines
    $code =~ s{\s//[^"\n]*$}{}mg;         # trailing comments
    my @paths;
    while ($code =~ /\buse\s+([^;]+);/g) { push @paths, expand($1); }
    while ($code =~ /\b((?:crate|super)(?:::\w+)+)/g) { push @paths, $1; }
    for my $path (@paths) {
        $path =~ s/^(?:pub(?:\([^)]*\))?)?//;
        if ($path =~ /^crate::(\w+)(?:::(\w+))?/) {
            my ($to_layer, $name) = ($1, $2 // '');
            next unless exists $rank{$to_layer};
            if ($rank{$to_layer} > $rank{$layer}) {
                push @violations, "$file names crate::$to_layer, a layer above $layer";
            }
            $edges{$from}{ node($to_layer, $name) } = 1;
        } elsif ($at_layer_level && $path =~ /^super::(\w+)/) {
            $edges{$from}{ node($layer, $1) } = 1;
        } elsif ($from eq "${layer}::mod" && $path =~ /^(?:self::)?(\w+)::/ && exists $modules{$layer}{$1}) {
            $edges{$from}{"${layer}::$1"} = 1;
        }
    }
    if ($from eq "${layer}::mod") {
        # A layer's mod.rs reaching into its own modules by their bare names.
        while ($code =~ /(?<![:\w])(\w+)::/g) {
            $edges{$from}{"${layer}::$1"} = 1 if exists $modules{$layer}{$1};
        }
    }
    delete $edges{$from}{$from};
}

# Tarjan's strongly connected components: a component of more than one module is a cycle.
my (%index, %low, %on, @stack, @cycles);
my $next = 0;
sub visit {
    my ($v) = @_;
    $index{$v} = $low{$v} = $next++;
    push @stack, $v;
    $on{$v} = 1;
    for my $w (sort keys %{ $edges{$v} // {} }) {
        if (!exists $index{$w}) { visit($w); $low{$v} = $low{$w} if $low{$w} < $low{$v}; }
        elsif ($on{$w}) { $low{$v} = $index{$w} if $index{$w} < $low{$v}; }
    }
    if ($low{$v} == $index{$v}) {
        my @component;
        while (1) { my $w = pop @stack; $on{$w} = 0; push @component, $w; last if $w eq $v; }
        push @cycles, [sort @component] if @component > 1;
    }
}
my %nodes = map { $_ => 1 } (keys %edges, map { keys %$_ } values %edges);
for my $v (sort keys %nodes) { visit($v) unless exists $index{$v}; }

my $count = scalar @cycles;
# Reported, not yet refused: the proxy's modules still import from each other.
for my $c (@cycles) { print STDERR "layers: module cycle: " . join(' <-> ', @$c) . "\n"; }
if (@violations) {
    my %seen;
    print STDERR "layers: $_\n" for grep { !$seen{$_}++ } @violations;
    print STDERR "layers: $count module cycles\n";
    exit 1;
}
printf "layers: %s, bottom-up; %d modules, %d edges, %d module cycles\n",
    join(' < ', @layers), scalar(keys %nodes), scalar(map { keys %$_ } values %edges), $count;
PERL
