package main

import (
	"strings"
	"testing"
	"time"
)

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{
		"0": 0, "1024": 1024, "4K": 4096, "4k": 4096, "4KiB": 4096, "4kb": 4096, "4KB": 4096, "1M": 1 << 20,
		"1MiB": 1 << 20, "1.5M": 3 << 19, "20GiB": 20 << 30, "2T": 2 << 40, "0x1000": 4096, "12B": 12, " 8K ": 8192,
	} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "x", "-1", "+1", "1Q", "99999999P", "1e3", "1.5", "12iB", "0x", "0xZZ", "K", "1_000"} {
		if n, err := parseSize(bad); err == nil {
			t.Errorf("parseSize(%q) accepted as %d", bad, n)
		} else if !strings.Contains(err.Error(), "4K, 1MiB") {
			t.Errorf("parseSize(%q): %v does not show the syntax", bad, err)
		}
	}
}

func TestParseDuration(t *testing.T) {
	for in, want := range map[string]time.Duration{
		"0": 0, "30": 30 * time.Second, "30s": 30 * time.Second, "5m": 5 * time.Minute, "1h30m": 90 * time.Minute,
		"7d": 7 * 24 * time.Hour, "1d12h": 36 * time.Hour, "250ms": 250 * time.Millisecond,
	} {
		if got, err := parseDuration(in); err != nil || got != want {
			t.Errorf("parseDuration(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "x", "-5s", "d", "1d-2h", "5 minutes", "1.5d"} {
		if d, err := parseDuration(bad); err == nil {
			t.Errorf("parseDuration(%q) accepted as %v", bad, d)
		}
	}
}

func TestCheckChunkSize(t *testing.T) {
	for _, n := range []int64{4096, 1 << 20, 16 << 20} {
		if got, err := checkChunkSize(n); err != nil || int64(got) != n {
			t.Errorf("checkChunkSize(%d) = %d, %v", n, got, err)
		}
	}
	for _, n := range []int64{0, 2048, 3000, 32 << 20, 1 << 30} {
		if _, err := checkChunkSize(n); err == nil {
			t.Errorf("checkChunkSize(%d) accepted", n)
		}
	}
}

// Every flag that takes a size or a duration takes the one syntax, and a
// bad one is a usage error naming it.
func TestSizeAndDurationFlags(t *testing.T) {
	for _, args := range [][]string{
		{"create", "--chunk-size", "1MiB", "--chunk-size", "lots"},
		{"verity", "format", "--data-block-size", "4KB", "--hash-offset", "0x1000", "--data-block-size", "big"},
		{"convert", "--stall-timeout", "forever"},
		{"cache", "gc", "--older-than", "7d", "--max-size", "huge"},
		{"nbd", "--timeout", "soon"},
	} {
		out, err := runCmd(t, args[0], args[1:]...)
		if _, ok := err.(*usageError); !ok {
			t.Errorf("%v: %v (%s), want a usage error", args, err, out)
			continue
		}
		bad := args[len(args)-1]
		if !strings.Contains(err.Error(), bad) {
			t.Errorf("%v: %v does not name %q", args, err, bad)
		}
	}
}
