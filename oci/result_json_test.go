package oci

import (
	"encoding/json"
	"regexp"
	"testing"
)

// convert --json prints a Result: every key is snake_case, as in every
// other JSON rafsnbd prints.
func TestResultJSONKeys(t *testing.T) {
	b, err := json.Marshal(Result{
		Layers:  []LayerResult{{Index: 1}},
		Exports: []Export{{Kind: "image", Verity: "x", Compat: "x", DataBlocks: 1, HashOffset: 1, RootHash: "x", Took: 1, Reused: true}},
	})
	if err != nil {
		t.Fatal(err)
	}
	var walk func(v any)
	snake := regexp.MustCompile(`^[a-z][a-z0-9_]*$`)
	n := 0
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			for k, e := range v {
				n++
				if !snake.MatchString(k) {
					t.Errorf("key %q is not snake_case", k)
				}
				walk(e)
			}
		case []any:
			for _, e := range v {
				walk(e)
			}
		}
	}
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatal(err)
	}
	walk(v)
	if n < 30 {
		t.Errorf("only %d keys seen in %s", n, b)
	}
}
