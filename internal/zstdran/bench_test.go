package zstdran

import (
	"bytes"
	"fmt"
	"io"
	"sync"
	"testing"

	"github.com/klauspost/compress/zstd"
)

// benchData is 100 MiB of text-like data with some incompressible parts.
// Built only when a benchmark runs.
var benchData = sync.OnceValue(func() []byte {
	var d []byte
	for i := range 100 {
		c := text(uint64(i), 1<<20)
		if i%10 == 0 {
			c = append(c[:900<<10], random(uint64(i), 124<<10)...) // some raw blocks
		}
		d = append(d, c...)
	}
	return d
})

var benchLayers sync.Map // frame size → *layer

// benchLayer is benchData in frames of frameSize: 1 MiB is the shape a
// layer written for lazy reading has, 16 KiB one frame per small file.
func benchLayer(frameSize int) *layer {
	if l, ok := benchLayers.Load(frameSize); ok {
		return l.(*layer)
	}
	var l layer
	e, _ := zstd.NewWriter(nil, zstd.WithEncoderConcurrency(2))
	for d := benchData(); len(d) > 0; {
		c := d[:min(len(d), frameSize)]
		d = d[len(c):]
		l.z = e.EncodeAll(c, l.z)
	}
	l.data = benchData()
	benchLayers.Store(frameSize, &l)
	return &l
}

func benchRead(b *testing.B, r func(io.Reader) io.Reader) {
	for _, fs := range []int{1 << 20, 16 << 10} {
		b.Run(fmt.Sprintf("frames=%dKiB", fs>>10), func(b *testing.B) { benchReadLayer(b, benchLayer(fs), r) })
	}
}

func benchReadLayer(b *testing.B, l *layer, r func(io.Reader) io.Reader) {
	b.SetBytes(int64(len(l.data)))
	buf := make([]byte, 1<<20)
	b.ResetTimer()
	for range b.N {
		n, err := io.CopyBuffer(io.Discard, r(bytes.NewReader(l.z)), buf)
		if err != nil || n != int64(len(l.data)) {
			b.Fatal(n, err)
		}
	}
	b.ReportMetric(float64(len(l.z))/float64(len(l.data)), "ratio")
}

// BenchmarkIndexer against BenchmarkDecoder (the same decoder options
// reading the stream whole) is what the frame walk and the per-frame
// Reset cost; BenchmarkDecoderConcurrent is klauspost's default.
func BenchmarkIndexer(b *testing.B) {
	benchRead(b, func(r io.Reader) io.Reader { return NewIndexer(r, 0) })
}

func BenchmarkDecoder(b *testing.B) {
	d := decoder(b)
	benchRead(b, func(r io.Reader) io.Reader { d.Reset(r); return d })
}

func BenchmarkDecoderConcurrent(b *testing.B) {
	d, err := zstd.NewReader(nil)
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	benchRead(b, func(r io.Reader) io.Reader { d.Reset(r); return d })
}
