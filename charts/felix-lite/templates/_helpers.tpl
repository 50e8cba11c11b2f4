{{/* Names and labels shared by every template. */}}

{{- define "felix-lite.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's resource name: "felix-lite" for a release named felix-lite. */}}
{{- define "felix-lite.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "felix-lite.selectorLabels" -}}
app.kubernetes.io/name: {{ include "felix-lite.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "felix-lite.labels" -}}
{{ include "felix-lite.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "felix-lite.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Where the agent's settings file is mounted in every container. */}}
{{- define "felix-lite.configPath" -}}/etc/felix-lite/config.yaml{{- end -}}

{{/* Shared emptyDir between the agent and the ExaBGP sidecar: socket + exabgp.conf. */}}
{{- define "felix-lite.runDir" -}}/var/run/felix-lite{{- end -}}
