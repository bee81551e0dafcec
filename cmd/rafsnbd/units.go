package main

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/urfave/cli/v3"
)

// The one syntax for sizes and durations, for every flag that takes one.
const (
	sizeSyntax     = "bytes, or with K, M, G or T (binary: 1K = 1KiB = 1024), or 0x hex: 4096, 4K, 1MiB, 1.5G, 0x1000"
	durationSyntax = "a number with s, m, h or d: 30s, 5m, 1h30m, 7d; a bare number is seconds"
)

// parseSize reads a byte count: plain bytes ("4096"), hex ("0x1000"), or a
// number with a binary unit ("4K", "4k", "4KB", "4KiB", "1.5G").
func parseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	bad := fmt.Errorf("size %q: want %s", s, sizeSyntax)
	if strings.HasPrefix(t, "0x") || strings.HasPrefix(t, "0X") {
		v, err := strconv.ParseUint(t[2:], 16, 62)
		if err != nil {
			return 0, bad
		}
		return int64(v), nil
	}
	u := strings.TrimSuffix(strings.ToUpper(t), "B")
	iec := strings.HasSuffix(u, "I") // "KiB": only after a unit letter
	u = strings.TrimSuffix(u, "I")
	shift := 0
	if u != "" {
		if i := strings.IndexByte("KMGTP", u[len(u)-1]); i >= 0 {
			shift = 10 * (i + 1)
			u = u[:len(u)-1]
		}
	}
	if iec && shift == 0 {
		return 0, bad
	}
	u = strings.TrimSpace(u)
	if u == "" || strings.ContainsAny(u, "+-eExXpP_") { // no signs, exponents, hex floats, digit separators
		return 0, bad
	}
	if shift == 0 {
		v, err := strconv.ParseUint(u, 10, 62)
		if err != nil {
			return 0, bad
		}
		return int64(v), nil
	}
	v, err := strconv.ParseFloat(u, 64)
	if err != nil || v*float64(int64(1)<<shift) > 1<<62 {
		return 0, bad
	}
	return int64(v * float64(int64(1)<<shift)), nil
}

// parseDuration reads a Go duration ("30s", "1h30m"), with days ("7d",
// "1d12h") as well; a bare number is seconds, as timeout(1) takes it.
func parseDuration(s string) (time.Duration, error) {
	t := strings.TrimSpace(s)
	if n, err := strconv.ParseUint(t, 10, 32); err == nil {
		return time.Duration(n) * time.Second, nil
	}
	var days time.Duration
	if i := strings.IndexByte(t, 'd'); i > 0 {
		n, err := strconv.ParseUint(t[:i], 10, 31)
		if err != nil {
			return 0, fmt.Errorf("duration %q: want %s", s, durationSyntax)
		}
		days, t = time.Duration(n)*24*time.Hour, t[i+1:]
		if t == "" {
			return days, nil
		}
	}
	d, err := time.ParseDuration(t)
	if err != nil || d < 0 {
		return 0, fmt.Errorf("duration %q: want %s", s, durationSyntax)
	}
	return days + d, nil
}

// formatSize is the short form of a size for --help defaults: "1M", "4K".
func formatSize(n int64) string {
	for _, u := range []struct {
		suffix string
		shift  uint
	}{{"T", 40}, {"G", 30}, {"M", 20}, {"K", 10}} {
		if n != 0 && n%(1<<u.shift) == 0 {
			return strconv.FormatInt(n>>u.shift, 10) + u.suffix
		}
	}
	return strconv.FormatInt(n, 10)
}

// sizeValue is a flag value in the size syntax.
type sizeValue int64

func (v *sizeValue) Set(s string) error {
	n, err := parseSize(s)
	if err != nil {
		return err
	}
	*v = sizeValue(n)
	return nil
}

func (v *sizeValue) String() string { return formatSize(int64(*v)) }
func (v *sizeValue) Get() any       { return int64(*v) }

// durationValue is a flag value in the duration syntax.
type durationValue time.Duration

func (v *durationValue) Set(s string) error {
	d, err := parseDuration(s)
	if err != nil {
		return err
	}
	*v = durationValue(d)
	return nil
}

func (v *durationValue) String() string { return time.Duration(*v).String() }
func (v *durationValue) Get() any       { return time.Duration(*v) }

// sizeFlag is a flag taking a size; read it with flagSize.
func sizeFlag(name string, def int64, usage string) *cli.GenericFlag {
	v := sizeValue(def)
	return &cli.GenericFlag{Name: name, Value: &v, Usage: usage + " (" + sizeSyntax + ")"}
}

// durationFlag is a flag taking a duration; read it with flagDuration.
func durationFlag(name string, def time.Duration, usage string) *cli.GenericFlag {
	v := durationValue(def)
	return &cli.GenericFlag{Name: name, Value: &v, Usage: usage + " (" + durationSyntax + ")"}
}

func flagSize(c *cli.Command, name string) int64 {
	n, _ := c.Value(name).(int64)
	return n
}

func flagDuration(c *cli.Command, name string) time.Duration {
	d, _ := c.Value(name).(time.Duration)
	return d
}
