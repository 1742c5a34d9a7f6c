package MailDkimHarness;
# What mail_dkim.pl and mail_dkim_arc.pl share: Mail::DKIM pointed at the tests' own DNS
# server, and the stdin/stdout framing (messages in as "<length>\n" plus that many bytes, one
# JSON object out per message per line; a message that makes Mail::DKIM die gives
# {"error": "..."}).
use strict;
use warnings;
use Exporter 'import';
use JSON::PP;
use Net::DNS::Resolver;
use Mail::DKIM::DNS;

our @EXPORT_OK = qw(use_test_dns serve);

# Mail::DKIM::DNS::query calls $RESOLVER->send(name, type): give it a resolver that asks only
# the test server (non-recursive, its port), with short timeouts for blackhole tests.
sub use_test_dns {
    my ( $host, $port, $timeout ) = @_;
    my $res = Net::DNS::Resolver->new(
        nameservers => [$host],
        port        => $port,
        recurse     => 0,
        retry       => 1,
        retrans     => 1,
        tcp_timeout => $timeout,
        udp_timeout => $timeout,
        searchlist  => [],
        defnames    => 0,
        dnsrch      => 0,
    );
    Mail::DKIM::DNS::resolver($res);
    $Mail::DKIM::DNS::TIMEOUT = $timeout;
    return;
}

sub _read_message {
    my $len = <STDIN>;
    return undef unless defined $len;
    chomp $len;
    die "bad frame header '$len'\n" unless $len =~ /^\d+$/;
    my $buf = '';
    while ( length($buf) < $len ) {
        my $n = read( STDIN, $buf, $len - length($buf), length($buf) );
        die "short read\n" unless $n;
    }
    return $buf;
}

# Answer every framed message on stdin with $handlers->{$mode}->($message).
sub serve {
    my ( $mode, $handlers ) = @_;
    my $json = JSON::PP->new->canonical->ascii;
    binmode STDIN;
    binmode STDOUT;
    $| = 1;
    while ( defined( my $msg = _read_message() ) ) {
        my $handler = $handlers->{$mode};
        my $out = eval { $handler ? $handler->($msg) : die "mode?\n" };
        unless ($out) {
            my $e = $@ || 'unknown error';
            chomp $e;
            $out = { error => $e };
        }
        print $json->encode($out), "\n";
    }
    return;
}

1;
