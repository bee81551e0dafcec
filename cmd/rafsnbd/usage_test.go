package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rafsnbd/rafsnbd/internal/testutil"
)

// runLine runs a command line in process as main does and returns the exit
// status, stdout and stderr.
func runLine(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := runMain(context.Background(), append([]string{"rafsnbd"}, args...), &stdout, &stderr)
	return code, stdout.String(), stderr.String()
}

// A command line that cannot be run gets one line on stderr naming the
// command and pointing at its --help, nothing on stdout, and exit status 2.
func TestUsageErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"inspect", "-j", "x"}, "rafsnbd inspect: flag provided but not defined: -j; see 'rafsnbd inspect --help'"},
		{[]string{"exprot"}, `rafsnbd: unknown command "exprot" (did you mean "export"?)`},
		{[]string{"inspect"}, "rafsnbd inspect: want one BOOTSTRAP argument, got 0"},
		{[]string{"--log-level", "verbose", "inspect", "x"}, `unknown level "verbose"`},
		{[]string{"export"}, "rafsnbd export: no image: give -B BOOTSTRAP"},
		{[]string{"export", "-B", "x.boot", "-D", "d", "--registry", "r"}, "-D and --registry both say where the blobs are"},
		{[]string{"serve", "-B", "x.boot", "-D", "d", "--prefetch", "/etc"}, "--prefetch fills the blob cache: give --cache-dir"},
		{[]string{"serve", "-B", "x.boot", "-D", "d", "--prefetch-all"}, "--prefetch-all fills the blob cache"},
		{[]string{"nbd", "-B", "x.boot", "-D", "d", "--insecure"}, "--insecure is for a --registry blob source"},
		{[]string{"serve", "--image", "a:1", "-B", "b.boot"}, "--image names the bootstrap and blobs itself"},
	} {
		code, stdout, stderr := runLine(t, tc.args...)
		if code != exitUsage || stdout != "" || !strings.Contains(stderr, tc.want) || strings.Count(stderr, "\n") != 1 {
			t.Errorf("%q: exit %d, stdout %q, stderr %q; want exit 2, one line on stderr with %q", tc.args, code, stdout, stderr, tc.want)
		}
	}
}

// Flags after a command's arguments count as flags, for every command (the
// README writes `convert REF --cache-dir DIR ...`).
func TestFlagsAfterArguments(t *testing.T) {
	boot := testutil.NydusFixture(t, "rafs-v6-2.2.boot")
	code, stdout, stderr := runLine(t, "inspect", boot, "--json")
	if code != 0 || !strings.HasPrefix(strings.TrimSpace(stdout), "{") {
		t.Errorf("inspect BOOT --json: exit %d, stdout %.60q, stderr %q", code, stdout, stderr)
	}
	// Flags after the argument of a subcommand, and after "--" an argument
	// that looks like a flag stays an argument.
	data := filepath.Join(t.TempDir(), "d")
	if err := os.WriteFile(data, make([]byte, 8192), 0o644); err != nil {
		t.Fatal(err)
	}
	code, stdout, stderr = runLine(t, "verity", "format", data, "--data-block-size", "4K", "--salt", "-")
	if code != 0 || !strings.Contains(stdout, "Root hash") {
		t.Errorf("verity format DATA --data-block-size 4K: exit %d, %q %q", code, stdout, stderr)
	}
	// The options line format prints is a command line verify takes as it
	// is, as veritysetup does: DATA, then the line, with the root at its end.
	var opts string
	for _, line := range strings.Split(stdout, "\n") {
		if rest, ok := strings.CutPrefix(line, "dm-verity options: "); ok {
			opts = rest
		}
	}
	pasted := []string{"verity", "verify", data}
	for _, f := range strings.Fields(opts) {
		pasted = append(pasted, strings.Trim(f, `"`)) // what the shell makes of -s ""
	}
	code, stdout, stderr = runLine(t, pasted...)
	if opts == "" || code != 0 || !strings.HasPrefix(stdout, "Verified ") {
		t.Errorf("%q: exit %d, %q %q", pasted, code, stdout, stderr)
	}
	if code, _, stderr = runLine(t, append(pasted, "--format=2")...); code != exitUsage || !strings.Contains(stderr, "only format 1") {
		t.Errorf("verify --format=2: exit %d, %q", code, stderr)
	}
	code, _, stderr = runLine(t, "inspect", "--", "--json")
	if code != 1 || !strings.Contains(stderr, "--json") {
		t.Errorf("inspect -- --json: exit %d, stderr %q; want the file --json not found", code, stderr)
	}
}

func TestVersion(t *testing.T) {
	for _, args := range [][]string{{"--version"}, {"-v"}} {
		code, stdout, _ := runLine(t, args...)
		if code != 0 || !strings.HasPrefix(stdout, "rafsnbd version ") || !strings.Contains(stdout, "go1.") {
			t.Errorf("%v: exit %d, %q", args, code, stdout)
		}
	}
}

// Every command's --help shows its flags with two dashes and an example
// command line.
func TestHelpTeaches(t *testing.T) {
	walk := func(prefix []string, names []string) {
		for _, name := range names {
			args := append(append([]string{}, prefix...), name)
			code, stdout, stderr := runLine(t, append(args, "--help")...)
			if code != 0 || stderr != "" {
				t.Errorf("%v --help: exit %d, stderr %q", args, code, stderr)
				continue
			}
			if strings.Contains(stdout, "\n   -log") || strings.Contains(stdout, " -help") {
				t.Errorf("%v --help shows a long flag with one dash:\n%s", args, stdout)
			}
			if !strings.Contains(stdout, "rafsnbd "+strings.Join(args, " ")) {
				t.Errorf("%v --help has no example command line:\n%s", args, stdout)
			}
		}
	}
	app := newApp()
	var top []string
	for _, c := range app.Commands {
		if c.Name == "help" {
			continue
		}
		top = append(top, c.Name)
		var subs []string
		for _, s := range c.Commands {
			if s.Name != "help" {
				subs = append(subs, s.Name)
			}
		}
		walk([]string{c.Name}, subs)
	}
	walk(nil, top)
}
