package gzran

import (
	"io"
	"os"
	"testing"
	"time"
)

// TestThroughput indexes $GZRAN_BENCH (a large .gz; scripts/bench-gzran.sh
// makes one) and prints MB/s of compressed input, to compare with gzip -dc.
func TestThroughput(t *testing.T) {
	path := os.Getenv("GZRAN_BENCH")
	if path == "" {
		t.Skip("GZRAN_BENCH not set")
	}
	span := int64(DefaultSpan)
	for range 5 {
		f, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		st, _ := f.Stat()
		start := time.Now()
		x := NewIndexer(f, span)
		n, err := io.CopyBuffer(io.Discard, x, make([]byte, 1<<20))
		if err != nil {
			t.Fatal(err)
		}
		d := time.Since(start)
		idx, _ := x.Index()
		b, _ := idx.MarshalBinary()
		f.Close()
		t.Logf("%.3fs %.1f MB/s compressed, %.1f MB/s out; %d checkpoints, index %d bytes = %.2f%% of compressed",
			d.Seconds(), float64(st.Size())/d.Seconds()/1e6, float64(n)/d.Seconds()/1e6, len(idx.Checkpoints), len(b), 100*float64(len(b))/float64(st.Size()))
	}
}
