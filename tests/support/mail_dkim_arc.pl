#!/usr/bin/perl
# Test helper: Perl Mail::DKIM's ARC classes (RFC 8617) as an independent sealer and
# verifier, asking only the tests' own DNS server (same framing as mail_dkim.pl).
#
#   mail_dkim_arc.pl verify --port P [--host H] [--timeout S]
#   mail_dkim_arc.pl seal --port P --key FILE --domain D --selector S --srvid ID
#                    [--chain ar|pass|fail|none] [--timestamp T]
#
# Input: messages on stdin, each framed as "<length>\n" and that many bytes (CRLF line ends).
# Output: one JSON object per message per line.
#   verify -> {"result": "pass|fail|none|...", "detail": "..."}
#   seal   -> {"result": "sealed|skipped", "detail": "...", "headers": [AS, AMS, AAR]}
# A message that makes Mail::DKIM die gives {"error": "..."}.
use strict;
use warnings;
use Getopt::Long;
use JSON::PP;
use Net::DNS::Resolver;
use Mail::DKIM::DNS;
use Mail::DKIM::ARC::Signer;
use Mail::DKIM::ARC::Verifier;

my $mode = shift @ARGV // '';
my %o = ( host => '127.0.0.1', port => 53, timeout => 5, chain => 'ar' );
GetOptions( \%o, 'host=s', 'port=i', 'timeout=i', 'key=s', 'domain=s', 'selector=s',
    'srvid=s', 'chain=s', 'timestamp=i' )
  or die "bad options\n";

my $res = Net::DNS::Resolver->new(
    nameservers => [ $o{host} ],
    port        => $o{port},
    recurse     => 0,
    retry       => 1,
    retrans     => 1,
    tcp_timeout => $o{timeout},
    udp_timeout => $o{timeout},
    searchlist  => [],
    defnames    => 0,
    dnsrch      => 0,
);
Mail::DKIM::DNS::resolver($res);
$Mail::DKIM::DNS::TIMEOUT = $o{timeout};

my $json = JSON::PP->new->canonical->ascii;
binmode STDIN;
binmode STDOUT;
$| = 1;

sub read_message {
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

sub verify {
    my ($msg) = @_;
    my $v = Mail::DKIM::ARC::Verifier->new();
    $v->PRINT($msg);
    $v->CLOSE;
    return { result => $v->result // '', detail => $v->result_detail // '' };
}

sub seal {
    my ($msg) = @_;
    my $s = Mail::DKIM::ARC::Signer->new(
        Algorithm => 'rsa-sha256',
        Chain     => $o{chain},
        Domain    => $o{domain},
        SrvId     => $o{srvid},
        Selector  => $o{selector},
        KeyFile   => $o{key},
        ( $o{timestamp} ? ( Timestamp => $o{timestamp} ) : () ),
    );
    $s->PRINT($msg);
    $s->CLOSE;
    my @headers = $s->result eq 'sealed' ? $s->as_strings : ();
    return { result => $s->result, detail => $s->{details} // '', headers => \@headers };
}

while ( defined( my $msg = read_message() ) ) {
    my $out = eval { $mode eq 'seal' ? seal($msg) : $mode eq 'verify' ? verify($msg) : die "mode?\n" };
    unless ($out) {
        my $e = $@ || 'unknown error';
        chomp $e;
        $out = { error => $e };
    }
    print $json->encode($out), "\n";
}
