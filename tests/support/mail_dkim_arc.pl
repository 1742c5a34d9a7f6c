#!/usr/bin/perl
# Test helper: Perl Mail::DKIM's ARC classes (RFC 8617) as an independent sealer and
# verifier, asking only the tests' own DNS server (framing: MailDkimHarness.pm).
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
use FindBin;
use lib $FindBin::Bin;
use MailDkimHarness qw(use_test_dns serve);
use Mail::DKIM::ARC::Signer;
use Mail::DKIM::ARC::Verifier;

my $mode = shift @ARGV // '';
my %o = ( host => '127.0.0.1', port => 53, timeout => 5, chain => 'ar' );
GetOptions( \%o, 'host=s', 'port=i', 'timeout=i', 'key=s', 'domain=s', 'selector=s',
    'srvid=s', 'chain=s', 'timestamp=i' )
  or die "bad options\n";

use_test_dns( $o{host}, $o{port}, $o{timeout} );

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

serve( $mode, { seal => \&seal, verify => \&verify } );
