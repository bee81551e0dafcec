package nydusimage

import (
	"errors"
	"reflect"
	"strings"
	"testing"
)

var testSpec = Spec{
	Values: []string{"request", "bootstrap"},
	Bools:  []string{"verity"},
	Short:  map[string]string{"R": "request", "B": "bootstrap"},
}

func TestParseForms(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want Args
	}{
		// nydus-snapshotter passes "-R blobs" as one argument.
		{[]string{"-R blobs", "f"}, Args{Values: map[string]string{"request": "blobs"}, Positional: []string{"f"}}},
		{[]string{"-R", "blobs", "f"}, Args{Values: map[string]string{"request": "blobs"}, Positional: []string{"f"}}},
		{[]string{"-Rblobs", "f"}, Args{Values: map[string]string{"request": "blobs"}, Positional: []string{"f"}}},
		{[]string{"f", "--request=blobs"}, Args{Values: map[string]string{"request": "blobs"}, Positional: []string{"f"}}},
		{[]string{"--request", "blobs", "--verity", "-B", "b", "--", "--x"},
			Args{Values: map[string]string{"request": "blobs", "bootstrap": "b"}, Bools: map[string]bool{"verity": true}, Positional: []string{"--x"}}},
		{[]string{"-", "a"}, Args{Positional: []string{"-", "a"}}},
	} {
		got, err := Parse(tc.args, testSpec)
		if err != nil {
			t.Errorf("Parse(%q): %v", tc.args, err)
			continue
		}
		if tc.want.Values == nil {
			tc.want.Values = map[string]string{}
		}
		if tc.want.Bools == nil {
			tc.want.Bools = map[string]bool{}
		}
		if !reflect.DeepEqual(*got, tc.want) {
			t.Errorf("Parse(%q) = %+v, want %+v", tc.args, *got, tc.want)
		}
	}
}

func TestParseErrors(t *testing.T) {
	for _, tc := range []struct {
		args        []string
		unsupported bool
		want        string
	}{
		{[]string{"--output-json", "x"}, true, "flag --output-json is not supported by rafsnbd"},
		{[]string{"-v"}, true, "flag -v is not supported by rafsnbd"},
		{[]string{"--request"}, false, "--request needs a value"},
		{[]string{"--verity=yes"}, false, "--verity takes no value"},
		{[]string{"--verity", "--verity"}, false, "--verity given twice"},
		{[]string{"-R", "a", "--request", "b"}, false, "--request given twice"},
	} {
		_, err := Parse(tc.args, testSpec)
		var ue *UnsupportedError
		if err == nil || errors.As(err, &ue) != tc.unsupported || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Parse(%q): %v, want %q (unsupported: %v)", tc.args, err, tc.want, tc.unsupported)
		}
	}
}
