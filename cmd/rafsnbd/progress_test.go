package main

import (
	"strings"
	"testing"
	"time"
)

func TestShortLabel(t *testing.T) {
	long := "export " + strings.Repeat("f0d6", 16) + ".image.disk"
	if got := shortLabel(long); got != "export f0d6f0d6f0d6….image.disk" {
		t.Errorf("shortLabel: %q", got)
	}
	if got := shortLabel("pull"); got != "pull" {
		t.Errorf("shortLabel(pull): %q", got)
	}
}

// The rate is over the last few seconds, so work found done at the start
// (a jump) does not show as an absurd rate once the window has moved on,
// and no rate is shown before there is half a second to measure.
func TestProgressRate(t *testing.T) {
	t0 := time.Now()
	p := &progress{label: "pull", total: 10 << 30}
	p.samples = []progressSample{{t0, 0}}
	if got := p.describe(t0.Add(100*time.Millisecond), 5<<30); strings.Contains(got, "/s") {
		t.Errorf("rate shown after 100 ms: %q", got)
	}
	// A 5 GiB jump at the start, then 10 MiB/s for 4 s: the window has
	// dropped the jump.
	p.samples = []progressSample{{t0, 0}, {t0.Add(10 * time.Millisecond), 5 << 30}}
	done := int64(5 << 30)
	for i := 1; i <= 40; i++ {
		now := t0.Add(10*time.Millisecond + time.Duration(i)*100*time.Millisecond)
		done += 1 << 20
		p.samples = append(p.samples, progressSample{now, done})
		for len(p.samples) > 2 && now.Sub(p.samples[1].at) > rateWindow {
			p.samples = p.samples[1:]
		}
	}
	got := p.describe(p.samples[len(p.samples)-1].at, done)
	if !strings.Contains(got, " 10.0MiB/s ") {
		t.Errorf("describe after the jump: %q, want 10.0MiB/s", got)
	}
}
