#!/usr/bin/perl
# Test helper: Perl Mail::DKIM (what DKIMproxy and SpamAssassin use) as a reference verifier
# and signer, pointed at the tests' own DNS server instead of the system resolver.
#
#   mail_dkim.pl verify --port P [--host H] [--timeout S] [--strict]
#   mail_dkim.pl sign --port P --key FILE --domain D --selector S
#                [--type dkim|domainkeys] [--method nofws|simple|relaxed/simple|...]
#                [--algorithm rsa-sha256|rsa-sha1] [--headers from:to:subject]
#
# Input: one or more messages on stdin, each framed as "<length>\n" followed by that many
# bytes (CRLF line ends). Output: one JSON object per message per line.
#   verify -> {"result","detail","signatures":[{"kind","domain","selector","result",
#              "detail","algorithm","identity"}]}  (signatures in header order)
#   sign   -> {"headers":["DKIM-Signature: ..."]}  (to prepend to the message)
# A message that makes Mail::DKIM die gives {"error": "..."}.
use strict;
use warnings;
use Getopt::Long;
use FindBin;
use lib $FindBin::Bin;
use MailDkimHarness qw(use_test_dns serve);
use Mail::DKIM::Verifier;
use Mail::DKIM::Signer;
use Mail::DKIM::Signature;
use Mail::DKIM::DkSignature;

my $mode = shift @ARGV // '';
my %o = (
    host      => '127.0.0.1',
    port      => 53,
    timeout   => 5,
    type      => 'dkim',
    algorithm => 'rsa-sha256',
    method    => 'relaxed/simple',
);
GetOptions( \%o, 'host=s', 'port=i', 'timeout=i', 'strict', 'key=s', 'domain=s',
    'selector=s', 'type=s', 'method=s', 'algorithm=s', 'headers=s' )
  or die "bad options\n";

use_test_dns( $o{host}, $o{port}, $o{timeout} );

sub verify {
    my ($msg) = @_;
    my $v = Mail::DKIM::Verifier->new( $o{strict} ? ( Strict => 1 ) : () );
    $v->PRINT($msg);
    $v->CLOSE;
    my @sigs;
    foreach my $sig ( $v->signatures ) {
        my $identity = eval { $sig->identity };
        push @sigs, {
            kind      => $sig->isa('Mail::DKIM::DkSignature') ? 'domainkeys' : 'dkim',
            domain    => $sig->domain // '',
            selector  => $sig->selector,
            result    => $sig->result // '',
            detail    => $sig->result_detail // '',
            algorithm => $sig->algorithm // '',
            identity  => $identity,
        };
    }
    return {
        result     => $v->result // '',
        detail     => $v->result_detail // '',
        signatures => \@sigs,
    };
}

sub sign {
    my ($msg) = @_;
    my %sig = (
        Algorithm => $o{algorithm},
        Method    => $o{method},
        Domain    => $o{domain},
        Selector  => $o{selector},
    );
    my $policy = sub {
        my $signer = shift;
        my $headers = $o{headers} // $signer->headers;
        if ( $o{type} eq 'domainkeys' ) {
            $signer->add_signature(
                Mail::DKIM::DkSignature->new(
                    %sig,
                    Algorithm => 'rsa-sha1',
                    Headers   => $headers,
                )
            );
        }
        else {
            $signer->add_signature( Mail::DKIM::Signature->new( %sig, Headers => $headers ) );
        }
        return;
    };
    my $signer = Mail::DKIM::Signer->new( KeyFile => $o{key}, Policy => $policy );
    $signer->PRINT($msg);
    $signer->CLOSE;
    my @headers = map { $_->as_string } $signer->signatures;
    return { headers => \@headers };
}

serve( $mode, { sign => \&sign, verify => \&verify } );
